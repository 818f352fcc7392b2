"""The training configuration: frozen dataclasses, `--set key=value` overrides, hashing, diffs.

Configuration is typed data (GUIDE.md habit 3, big_vision style). Every choice that the
reproduction literature found to matter (S4L_REFERENCE.md section 5: BN batch, crop semantics,
weight-decay scope, EMA use) is a field here, defaulting to the original release's value, and the
whole config is stored in the workdir (config.json) and in every checkpoint.

An "epoch" counts passes over the LABELLED subset (the release's
steps_per_epoch = n_labelled // batch_size), whatever the objective.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from s4l.errors import UserError
from s4l.training.objectives.base import ObjectiveConfig

PRECISIONS = ("fp32", "bf16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Backbone fields of `s4l.training.model.ModelSpec`; heads come from the objective."""

    width: float = 1.0
    stem: str = "imagenet"
    bn_eps: float = 1e-3
    bn_momentum: float = 0.01


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the images come from and which of them carry labels.

    root: an image-folder root (`train/<class>/...`), `builtin:digits`, ... (`s4l.datasets`).
    labels / labels_per_class / label_fraction: at most one; none = every image is labelled.
    val_per_class: images per class held out of training as the tiny validation split
      (paper Fig. 3: 1 per class selects models as well as the 50k held-out split).
    pseudo_labels: a file from `s4l pseudo-label`; the student trains on ALL images with
      these hard labels (ground truth where the image is labelled).
    augment: the training crop. "inception" is the release's (area crop_min_area..1, then
      resize, flip); "pad-crop" is the CIFAR benchmarks' (Oliver et al. 2018, FixMatch):
      reflect-pad by pad_crop pixels, random image_size window, flip. A departure from the
      release, for 32 px images, where a 5%-area inception crop leaves ~7x7 pixels.
    """

    root: str = ""
    train_split: str = "train"
    eval_split: str = "val"
    image_size: int = 224
    eval_resize: int = 256
    crop_min_area: float = 0.05
    augment: str = "inception"
    pad_crop: int = 4
    hsv_noise: bool = False
    labels: str | None = None
    labels_per_class: int | None = None
    label_fraction: float | None = None
    label_seed: int = 0
    val_per_class: int = 0
    pseudo_labels: str | None = None
    workers: int = 4
    eval_batch_size: int = 256
    eval_limit: int | None = None


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """SGD with momentum 0.9 (not Nesterov), coupled L2 on conv and head kernels only.

    batch_size: the GLOBAL labelled batch; the unlabelled batch is
      batch_size * unsup_batch_mult (the release's unsup_batch_mult, 1).
    total_steps: if set, stops after this many steps (smoke runs); the schedule stays in epochs.
    """

    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-3
    batch_size: int = 256
    unsup_batch_mult: int = 1
    warmup_epochs: float = 5.0
    decay_epochs: tuple[float, ...] = (140.0, 160.0, 180.0)
    total_epochs: float = 200.0
    total_steps: int | None = None
    grad_clip: float | None = None


@dataclasses.dataclass(frozen=True)
class ObjectiveSection(ObjectiveConfig):
    """The objective's name (a key of `s4l.training.objectives.OBJECTIVES`) plus every loss
    weight and switch of `ObjectiveConfig` (release defaults, documented there)."""

    name: str = "supervised"

    def objective_config(self) -> ObjectiveConfig:
        """The plain ObjectiveConfig the objective classes take (without `name`)."""
        return ObjectiveConfig(
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(ObjectiveConfig)}
        )


@dataclasses.dataclass(frozen=True)
class BNConfig:
    """Per-device BatchNorm batch (the release's reproduction lever) and SyncBN.

    ghost_batch: labelled images per BN batch ("per-device batch"); each step is split into
      batch_size // ghost_batch shards, each with its own BN statistics and its loss, and the
      gradients are averaged over shards, exactly as the release's per-core TPU losses with a
      cross-shard gradient mean. None = one shard per process.
    sync: synchronise BN statistics across processes (MOAM step 1).
    """

    ghost_batch: int | None = None
    sync: bool = False


@dataclasses.dataclass(frozen=True)
class EMAConfig:
    """Polyak averaging: half-life in epochs (MOAM: 1), None = off."""

    half_life_epochs: float | None = None


@dataclasses.dataclass(frozen=True)
class InitConfig:
    """Start from another checkpoint's backbone (self-supervised + linear / fine-tune).

    checkpoint: a `.pt` from `s4l train`; its backbone weights are loaded strictly, heads the
      objective needs are kept when the checkpoint has them with the same shape and
      re-initialised otherwise (`reset_heads` re-initialises them all). Linear evaluation is
      the `linear` objective (frozen backbone in eval mode, only the class head trains).
    """

    checkpoint: str | None = None
    reset_heads: bool = True


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    every_epochs: float = 10.0
    rotation_average: bool = True
    # What the evaluations during training read: "all" splits, or "heldout" only, so that a
    # study's learning curve never looks at the test split before the end (the final
    # evaluation always reads every split).
    intermediate: str = "all"


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_epochs: float = 1.0
    every_steps: int | None = None
    keep: int = 2


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The whole training run; `preset` names where it started from (informational)."""

    preset: str = "custom"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    objective: ObjectiveSection = dataclasses.field(default_factory=ObjectiveSection)
    bn: BNConfig = dataclasses.field(default_factory=BNConfig)
    ema: EMAConfig = dataclasses.field(default_factory=EMAConfig)
    init: InitConfig = dataclasses.field(default_factory=InitConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    seed: int = 0
    log_every_steps: int = 50

    def __post_init__(self) -> None:
        validate(self)


# Fields that change how a run is executed but not what it computes: a resumed run may differ
# in these (e.g. more loader workers on a new machine) without being refused.
EXECUTION_ONLY = frozenset(
    {
        "data.workers",
        "data.eval_batch_size",
        "log_every_steps",
        "checkpoint.keep",
        "compile",
    }
)


def validate(cfg: TrainConfig) -> None:
    """Reject inconsistent values with a message naming the field."""
    d, o = cfg.data, cfg.optim
    if cfg.precision not in PRECISIONS:
        raise UserError(f"precision must be one of {PRECISIONS}, got {cfg.precision!r}")
    if cfg.model.stem not in ("imagenet", "small", "small-s2"):
        raise UserError("model.stem must be 'imagenet', 'small' or 'small-s2', "
                        f"got {cfg.model.stem!r}")
    given = [k for k in ("labels", "labels_per_class", "label_fraction") if getattr(d, k) is not None]
    if len(given) > 1:
        raise UserError(f"give at most one of data.labels/labels_per_class/label_fraction, got {given}")
    if d.label_fraction is not None and not 0.0 < d.label_fraction <= 1.0:
        raise UserError(f"data.label_fraction must be in (0, 1], got {d.label_fraction}")
    if d.labels_per_class is not None and d.labels_per_class < 1:
        raise UserError(f"data.labels_per_class must be >= 1, got {d.labels_per_class}")
    if d.image_size < 8 or d.eval_resize < d.image_size:
        raise UserError(
            f"need 8 <= data.image_size <= data.eval_resize, got {d.image_size}, {d.eval_resize}"
        )
    if d.augment not in ("inception", "pad-crop"):
        raise UserError(f"data.augment must be 'inception' (the release's crop) or 'pad-crop' "
                        f"(the CIFAR benchmarks' reflect-pad + random crop), got {d.augment!r}")
    if d.pad_crop < 0 or d.pad_crop > d.image_size:
        raise UserError(f"data.pad_crop must be in [0, data.image_size], got {d.pad_crop}")
    if d.val_per_class < 0 or d.workers < 0:
        raise UserError("data.val_per_class and data.workers must be >= 0")
    if o.batch_size < 1 or o.unsup_batch_mult < 0:
        raise UserError("optim.batch_size must be >= 1 and optim.unsup_batch_mult >= 0")
    if o.lr < 0 or o.weight_decay < 0 or not 0 <= o.momentum < 1:
        raise UserError("need optim.lr >= 0, optim.weight_decay >= 0, 0 <= optim.momentum < 1")
    if o.total_epochs <= 0 or o.warmup_epochs < 0:
        raise UserError("need optim.total_epochs > 0 and optim.warmup_epochs >= 0")
    if list(o.decay_epochs) != sorted(o.decay_epochs):
        raise UserError(f"optim.decay_epochs must be increasing, got {list(o.decay_epochs)}")
    if o.total_steps is not None and o.total_steps < 1:
        raise UserError("optim.total_steps must be >= 1")
    g = cfg.bn.ghost_batch
    if g is not None and (g < 1 or o.batch_size % g):
        raise UserError(
            f"bn.ghost_batch ({g}) must divide optim.batch_size ({o.batch_size}): the batch is "
            "split into per-device BN shards of that many labelled images"
        )
    if cfg.ema.half_life_epochs is not None and cfg.ema.half_life_epochs <= 0:
        raise UserError("ema.half_life_epochs must be > 0 (or null for no EMA)")
    if cfg.eval.intermediate not in ("all", "heldout"):
        raise UserError(f"eval.intermediate must be 'all' or 'heldout', got {cfg.eval.intermediate!r}")
    if cfg.eval.every_epochs <= 0 or cfg.checkpoint.every_epochs <= 0:
        raise UserError("eval.every_epochs and checkpoint.every_epochs must be > 0")
    if cfg.checkpoint.keep < 1:
        raise UserError("checkpoint.keep must be >= 1")
    if cfg.log_every_steps < 1:
        raise UserError("log_every_steps must be >= 1")


# ----------------------------------------------------------------------------- dict forms


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain-JSON dict (tuples become lists)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def from_dict(d: Mapping[str, Any], cls: type = TrainConfig, prefix: str = "", *,
              where: str | None = None) -> Any:
    """Inverse of `to_dict`, type-checked; unknown keys are an error listing the valid ones.

    Any frozen dataclass works (the study file's tables are read with it too): fields may be
    nested dataclasses, tuples of them, `dict[str, X]` tables or `Any`; a field without a
    default is required. `where` names the table in errors ("FILE: method 'a'") instead of
    the dotted config-key prefix.
    """
    if not isinstance(d, Mapping):
        raise UserError(f"{where or 'expected a mapping for ' + cls.__name__}"
                        f"{': a table expected' if where else ''}, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        if where:
            raise UserError(f"{where}: unknown keys {unknown}; valid: {sorted(fields)}")
        raise UserError(
            f"unknown config key(s) {[prefix + k for k in unknown]}; "
            f"valid: {[prefix + k for k in fields]}"
        )
    for name, f in fields.items():
        if (name not in d and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING):
            raise UserError(f"{where or cls.__name__}: missing {prefix + name!r}")
    kwargs = {}
    for name, value in d.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(value, tp, prefix + name + ".",
                                     where=where and f"{where}: {name}")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name, where)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str, where: str | None = None) -> Any:
    """Check `value` against the annotation `tp` (JSON-level types), converting lists to tuples."""
    if where:
        try:
            return _coerce(value, tp, key)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(value, tp, key + ".")
    if origin is dict:
        if not isinstance(value, Mapping):
            raise UserError(f"{key}: expected a table, got {value!r}")
        _, value_tp = typing.get_args(tp)
        return {str(k): _coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except UserError as e:
                errors.append(str(e))
        raise UserError(f"{key}: {value!r} is not a valid {_type_name(tp)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key}: expected a list, got {value!r}")
        (item_tp, _ellipsis) = typing.get_args(tp)
        return tuple(_coerce(v, item_tp, key) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise UserError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise UserError(f"{key}: expected a string, got {value!r}")
    raise UserError(f"{key}: unsupported type {tp}")


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("NoneType", "null")


# ----------------------------------------------------------------------------- overrides


def all_keys(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """Every dotted key a `--set` may name."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys.extend(all_keys(tp, prefix + f.name + "."))
        else:
            keys.append(prefix + f.name)
    return keys


def parse_value(text: str) -> Any:
    """`--set` values are JSON (0.1, true, null, [1, 2], "x"); anything else is a plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(cfg: TrainConfig, overrides: Iterable[str | tuple[str, Any]]) -> TrainConfig:
    """Apply `key=value` strings (or (key, value) pairs) with type checking.

    Unknown keys raise UserError listing the valid ones; values are checked against the
    field's annotation (an int field refuses 0.5; a tuple field takes "[140, 160]" or "140,160").
    """
    d = to_dict(cfg)
    valid = all_keys()
    explicit: set[str] = set()
    for item in overrides:
        if isinstance(item, str):
            if "=" not in item:
                raise UserError(f"--set expects key=value, got {item!r}")
            key, text = item.split("=", 1)
            key = key.strip()
            value = parse_value(text.strip())
            if isinstance(value, str) and "," in value and _is_tuple_key(key):
                value = [parse_value(v) for v in value.split(",")]
        else:
            key, value = item
        if key not in valid:
            raise UserError(f"unknown config key {key!r}; valid keys: {', '.join(valid)}")
        node = d
        parts = key.split(".")
        for p in parts[:-1]:
            node = node[p]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and _is_tuple_key(key):
            value = [value]
        node[parts[-1]] = value
        explicit.add(key)
    # The labelled-subset fields are alternatives: naming one (non-null) replaces the preset's.
    label_keys = ("labels", "labels_per_class", "label_fraction")
    if any(f"data.{k}" in explicit and d["data"][k] is not None for k in label_keys):
        for k in label_keys:
            if f"data.{k}" not in explicit:
                d["data"][k] = None
    return from_dict(d)


def _is_tuple_key(key: str) -> bool:
    cls: Any = TrainConfig
    parts = key.split(".")
    for p in parts[:-1]:
        cls = typing.get_type_hints(cls).get(p)
        if cls is None:
            return False
    tp = typing.get_type_hints(cls).get(parts[-1])
    return typing.get_origin(tp) is tuple


def replace(cfg: Any, **changes: Any) -> Any:
    """dataclasses.replace that accepts dotted keys: replace(cfg, **{"optim.lr": 0.1})."""
    return apply_overrides(cfg, list(changes.items()))


# ----------------------------------------------------------------------------- identity


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


# Fields added after runs were recorded, with their defaults: at the default they are left out
# of the hash, so a config written before the field existed keeps its hash (and its checkpoint
# resumes); any other value is part of the run's identity.
ADDED_FIELDS: dict[str, Any] = {"data.augment": "inception", "data.pad_crop": 4,
                                 "objective.class_rotations": "all", "eval.intermediate": "all"}


def semantic_dict(cfg: TrainConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The flattened config without execution-only fields (what a resume must match)."""
    d = to_dict(cfg) if isinstance(cfg, TrainConfig) else dict(cfg)
    return {k: v for k, v in flatten(d).items()
            if k not in EXECUTION_ONLY and not (k in ADDED_FIELDS and v == ADDED_FIELDS[k])}


def config_hash(cfg: TrainConfig | Mapping[str, Any]) -> str:
    """sha256 (first 16 hex) of the canonical JSON of the semantic config."""
    blob = json.dumps(semantic_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def diff(a: TrainConfig | Mapping[str, Any], b: TrainConfig | Mapping[str, Any]) -> dict[str, tuple]:
    """Semantic keys whose values differ: {key: (a_value, b_value)} (missing = '<absent>')."""
    fa, fb = semantic_dict(a), semantic_dict(b)
    out = {}
    for k in sorted(set(fa) | set(fb)):
        va, vb = fa.get(k, "<absent>"), fb.get(k, "<absent>")
        if va != vb:
            out[k] = (va, vb)
    return out


def save_json(cfg: TrainConfig, path) -> None:
    from s4l.io import atomic_write_json

    atomic_write_json(path, to_dict(cfg), indent=2, sort_keys=True, newline=True)


CONFIG_MAX_BYTES = 4 << 20


def load_json(path) -> TrainConfig:
    from s4l.safeload import load_json_file

    doc = load_json_file(path, "config file", CONFIG_MAX_BYTES)
    if not isinstance(doc, dict):
        raise UserError(f"config file {str(path)!r}: expected a JSON object")
    return from_dict(doc)
