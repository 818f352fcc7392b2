"""The original release's TF-Hub modules as s4l checkpoints: a numpy-only TF tensor-bundle reader,
the module's graph checked as data (never run), the one-to-one name mapping, downloads from the
public bucket, and the importer (issue 26)."""
