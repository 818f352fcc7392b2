"""Response schemas of the HTTP API (they make the committed OpenAPI document)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from s4l.service.errors import ErrorBody


class ImageError(BaseModel):
    error: ErrorBody


class EmbeddingResult(BaseModel):
    embedding: list[float]


class EmbedResponse(BaseModel):
    model: str
    dim: int
    normalized: bool
    results: list[EmbeddingResult | ImageError] = Field(
        description="one entry per input image, in input order")


class Prediction(BaseModel):
    label: str
    index: int
    score: float = Field(description="softmax probability")


class ClassifyResult(BaseModel):
    top_k: list[Prediction]


class ClassifyResponse(BaseModel):
    model: str
    num_classes: int
    results: list[ClassifyResult | ImageError] = Field(
        description="one entry per input image, in input order")


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    provider: str | None = None
    reason: str | None = None
