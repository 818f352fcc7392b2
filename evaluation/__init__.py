"""Evaluation: feature extraction to HDF5, linear probes, the small-validation-set study."""
