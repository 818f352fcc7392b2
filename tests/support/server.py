"""The service tests' helpers: tiny checkpoints, exported models, JPEG bytes, a real server process."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from support.net import free_port

ROOT = Path(__file__).resolve().parents[2]  # the checkout
CLASSES = ("apple", "banana", "cherry")


def make_checkpoint(path: Path, *, classes=CLASSES, crop: int = 32, seed: int = 0,
                    with_ema: bool = False, width: float = 0.0625, preprocess=None) -> Path:
    """A tiny real checkpoint (small stem) in the contract format, as the trainer writes it.

    ``classes``: class names (a head of that size, names saved), a count (a head, no names) or
    empty (no head); ``preprocess``: a PreprocessSpec, by default the one for ``crop``."""
    import torch

    from s4l.imaging import PreprocessSpec
    from s4l.training.checkpoint import config_hash, save_checkpoint
    from s4l.training.model import ModelSpec, build_model

    torch.manual_seed(seed)
    n_classes = classes if isinstance(classes, int) else len(classes or ())
    names = None if isinstance(classes, int) or not classes else list(classes)
    spec = ModelSpec(width=width, stem="small", heads={"classes": n_classes} if n_classes else {})
    model = build_model(spec)
    # Non-trivial BN statistics, so eval-mode normalisation is exercised by the parity checks.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    ema = None
    if with_ema:
        ema = {k: v.clone() * (1.01 if v.is_floating_point() else 1) for k, v in model.state_dict().items()}
    config = {"test": True, "crop": crop}
    save_checkpoint(path, {
        "model_spec": spec.to_dict(), "model": model.state_dict(), "ema": ema, "config": config,
        "config_hash": config_hash(config), "class_names": names,
        "preprocess": (preprocess or PreprocessSpec.for_image_size(crop)).to_dict(), "step": 0, "epoch": 0,
        "optimizer": None, "rng": None, "data_state": None,
        "provenance": {"git_sha": "test", "versions": {}, "created_at": "test"}})
    return path


def export_tiny(tmp: Path, **kw) -> Path:
    from s4l.service.export import export_onnx

    ckpt = make_checkpoint(tmp / "tiny.pt", **kw)
    out = tmp / "tiny.onnx"
    export_onnx(ckpt, out)
    return out


def jpeg_bytes(size=(48, 40), seed=0, **save) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


class ServerProcess:
    """``s4l serve`` in a child process on a loopback port: a real uvicorn, as users run it."""

    def __init__(self, model: Path, env: dict[str, str] | None = None, python: str = sys.executable,
                 cwd: Path | None = None, log: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log or model.with_suffix(f".{self.port}.log")
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("S4L_")}
        full_env.update({"S4L_MODEL": str(model), "S4L_PORT": str(self.port),
                         "S4L_HOST": "127.0.0.1", "OMP_NUM_THREADS": "1", **(env or {})})
        self._logf = open(self.log, "wb")
        self.proc = subprocess.Popen([python, "-m", "s4l.cli", "serve"], env=full_env,
                                     stdout=self._logf, stderr=subprocess.STDOUT, cwd=cwd or ROOT)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        if not self._logf.closed:
            self._logf.flush()
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._logf.close()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
