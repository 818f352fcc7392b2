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
    """One head asked (or the default one)."""

    model: str
    head: str = Field(description="the head that answered ('model': the model's own class head)")
    num_classes: int
    results: list[ClassifyResult | ImageError] = Field(
        description="one entry per input image, in input order")


class HeadsResult(BaseModel):
    heads: dict[str, ClassifyResult] = Field(description="head name -> that head's top-k")


class MultiHeadClassifyResponse(BaseModel):
    """Several heads asked (``?head=a&head=b``): one backbone run per image, every head's top-k."""

    model: str
    heads: list[str]
    results: list[HeadsResult | ImageError] = Field(
        description="one entry per input image, in input order")


class HeadInfo(BaseModel):
    name: str
    source: str = Field(description="'model' (the ONNX logits output) or 'file' (a head artifact)")
    path: str | None
    num_classes: int | None
    labels: list[str] | None
    model_hash: str
    layer: str
    metrics: dict = Field(description="validation top1/top5 (percent) recorded by `s4l probe`")
    solver: str | None
    settings: dict
    provenance: dict


class HeadsResponse(BaseModel):
    default: str | None = Field(description="the head /classify uses without ?head=")
    generation: int = Field(description="0 at start-up, +1 per successful reload")
    loaded_at: str
    heads: list[HeadInfo]


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    provider: str | None = None
    reason: str | None = None


class SearchMatch(BaseModel):
    row: int = Field(description="row of the gallery's feature file")
    path: str = Field(description="the image path `s4l extract` recorded")
    label: int | None = Field(description="the row's label; null when unknown")
    class_name: str | None = Field(description="the label's class name, when the file names classes")
    score: float = Field(description="cosine similarity")


class SearchResult(BaseModel):
    matches: list[SearchMatch] = Field(description="nearest rows, best first")


class SearchResponse(BaseModel):
    model: str
    gallery: str
    rows: int = Field(description="rows in the gallery")
    results: list[SearchResult | ImageError] = Field(
        description="one entry per input image or vector, in input order")
