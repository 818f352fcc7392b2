"""Service: ONNX export (may import torch) and the HTTP server (must not import torch)."""
