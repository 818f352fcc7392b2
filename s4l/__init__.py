"""s4l: S4L (Self-Supervised Semi-Supervised Learning, Zhai et al. ICCV 2019) in PyTorch.

This top-level folder is the small torch-free core: the version, the `s4l` command's
dispatcher and the shared image decode / eval-crop specification.
"""

__version__ = "0.1.0"
