"""Helpers shared by the tests, the benchmarks and docker/report.py; no tests live here.

- ``support.server``: tiny checkpoints and exported models, JPEG bytes, ``ServerProcess``
  (a real ``s4l serve`` on a loopback port).
- ``support.net``: ``free_port``.
- ``support.images``: ``make_image_folder`` (a small real image-folder data set).
- ``support.hostile``: the corpus of hostile files (tests/test_untrusted.py).

pytest imports it as the top-level package ``support`` (tests/ is on sys.path, as for
conftest.py); tests/conftest.py keeps it out of collection. Scripts outside pytest put tests/
on sys.path first.
"""
