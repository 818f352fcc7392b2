"""Typed server settings, read from arguments and the environment (prefix ``S4L_``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from s4l.service.gallery import parse_gallery_specs

DEFAULT_MAX_PIXELS = 40_000_000


class Settings(BaseSettings):
    """Everything the server reads at start-up. ``S4L_MODEL=model.onnx`` sets ``model`` and so on."""

    model_config = SettingsConfigDict(env_prefix="S4L_", extra="ignore", frozen=True)

    model: Path | None = Field(None, description="the exported ONNX file")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    model_id: str | None = Field(None, description="name reported as `model`; default: file stem + hash")

    provider: Literal["auto", "cpu", "cuda"] = Field(
        "cpu", description="cpu; cuda (refuse to start without it); auto (cuda when present)")
    backend: Literal["onnxruntime", "openvino"] = Field(
        "onnxruntime", description="inference engine: onnxruntime, or openvino (pip install 's4l[openvino]')")
    precision: Literal["fp32", "bf16", "auto"] = Field(
        "auto", description="openvino: bf16 (native bf16 CPUs only), fp32, or auto (bf16 where "
        "native and within the parity gate, else fp32); onnxruntime: fp32 (auto = fp32)")
    parity_images: Path | None = Field(
        None, description="folder of held-out images for openvino's parity gate; unset: built-in crops")
    intra_op_threads: int = Field(0, ge=0, description="0: the CPUs this process may use")
    ort_spinning: bool = Field(
        False, description="let onnxruntime's idle threads spin (faster alone, slower beside decoding)")
    decode_threads: int = Field(0, ge=0, description="0: the CPUs this process may use")

    max_batch_size: int = Field(
        0, ge=0, le=4096,
        description="0: auto (2 x usable CPUs on CPU, 32 on CUDA); see effective_max_batch_size")
    max_wait_ms: float = Field(5.0, ge=0.0, le=10_000.0)
    max_queue_images: int = Field(256, ge=1, description="admitted images before 503")
    request_timeout_s: float = Field(30.0, gt=0.0)

    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_images_per_request: int = Field(64, ge=1)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)

    heads: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="task heads NAME=PATH (s4l.heads files); env: comma-separated or a JSON list")
    admin_token: SecretStr | None = Field(
        None, description="Bearer token of POST /admin/reload-heads; unset: the route is disabled")

    api_key: SecretStr | None = Field(None, description="when set, Bearer token required")
    graceful_shutdown_s: float = Field(30.0, ge=0.0)
    log_level: str = "info"

    @field_validator("heads", mode="before")
    @classmethod
    def _split_heads(cls, v):
        if isinstance(v, str):
            v = v.strip()
            if v.startswith("["):
                return tuple(json.loads(v))
            return tuple(p.strip() for p in v.split(",") if p.strip())
        return v

    galleries: Annotated[dict[str, Path], NoDecode] = Field(
        default_factory=dict,
        description="feature files served by /search: NAME=PATH items, comma-separated in S4L_GALLERIES")
    gallery_dtype: Literal["float32", "float16"] = Field(
        "float32", description="gallery storage: float32 (4 x D bytes per row, fastest) or float16 (half)")

    @field_validator("galleries", mode="before")
    @classmethod
    def _galleries(cls, v):
        return parse_gallery_specs(v)
