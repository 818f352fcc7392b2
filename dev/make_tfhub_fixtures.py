"""Write TF-Hub modules with REAL TensorFlow running the original release's own code, and
TensorFlow's outputs on fixed inputs: the parity fixtures of `s4l import-tfhub` (issue 26).

Dev only, never run in CI, and the only place in s4l that imports TensorFlow. It needs a separate
environment (TensorFlow must never be a dependency of s4l):

    python3.11 -m venv /tmp/tfenv
    /tmp/tfenv/bin/pip install tensorflow-cpu tf-keras tensorflow-hub==0.15.0
    git clone https://github.com/google-research/s4l /tmp/s4l-release   # commit 8f1cf05
    TF_USE_LEGACY_KERAS=1 /tmp/tfenv/bin/python dev/make_tfhub_fixtures.py \
        --release /tmp/s4l-release            # -> tests/fixtures/tfhub/

Each family's module is built by the release's own `semi_supervised/<task>.py` `model_fn` in
PREDICT mode, which calls its `trainer.make_hub_predictor` (the code that exported the paper's
modules) on its `models/resnet.py` and `tpu_ops.py` (MOAM's `rotation_vat` uses
`cross_replica_batch_norm`, whence the `batch_norm` scope). What TF2 no longer has is shimmed
below (`tensorflow.contrib.*`, the TPU context, `tf.estimator.ModeKeys`, `tf.flags`); nothing in
the model code is changed. The variables get random values rounded to a coarse grid (so the
fixtures compress), the module is exported by tensorflow_hub, loaded back by tensorflow_hub in a
fresh graph, and its `default` and `representation` signatures are run on fixed uint8 images
scaled to [-1, 1] as the release's input pipeline does.

For measurements only (not committed): `--families rotation --filters-factor 4 --out /tmp/std`
writes a standard-width module, `--families rotation_vat --filters-factor 16` a 4x-wide one
(MOAM's width, ~1.5 GB); `--no-outputs` skips running it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import types
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
RELEASE_COMMIT = "8f1cf0555dad64d987309e3bee682cf8390bf48a"
# family -> the release's task module (semi_supervised/<task>.py)
FAMILIES = {"supervised": "supervised", "rotation": "rotation", "exemplar": "exemplar",
            "rotation_vat": "rotation_vat"}


def install_shims():
    """Give TF 2.x what the release (written for TF 1.13 + contrib) imports, and nothing more."""
    import absl.flags
    import tensorflow as tf2
    import tensorflow.compat.v1 as tf

    tf.disable_v2_behavior()  # graph mode, v1 TensorShape (tpu_ops reads `.value` of a dim)

    def l2_regularizer(scale, scope=None):
        return (lambda w: scale * tf.nn.l2_loss(w)) if scale else None

    class _TPUContext:
        number_of_shards = None  # not on a TPU: tpu_ops uses local batch statistics

    def estimator_spec(mode, **kw):
        return types.SimpleNamespace(mode=mode, **kw)

    mods = {
        "tensorflow.contrib": {},
        "tensorflow.contrib.layers": {"l2_regularizer": l2_regularizer,
                                      "max_pool2d": None, "avg_pool2d": None},
        "tensorflow.contrib.tpu": {"CrossShardOptimizer": None, "TPUEstimatorSpec": estimator_spec},
        "tensorflow.contrib.tpu.python": {},
        "tensorflow.contrib.tpu.python.tpu": {},
        "tensorflow.contrib.tpu.python.tpu.tpu_function": {"get_tpu_context": _TPUContext},
        "tensorflow.contrib.summary": {},
        "tensorflow.contrib.data": {"AUTOTUNE": -1},
        "tensorflow.contrib.lookup": {"index_table_from_tensor": None},
        # The release downloads this file from tensorflow/models; only its training-time
        # preprocessing uses it, never the exported model.
        "inception_preprocessing": {},
    }
    for name, attrs in mods.items():
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        sys.modules[name] = m
    # Modules of the release that `import tensorflow as tf` use the TF1 API through it.
    modekeys = types.SimpleNamespace(TRAIN="train", EVAL="eval", PREDICT="infer")
    estimator = types.ModuleType("tensorflow.compat.v1.estimator")  # tensorflow_hub imports it
    estimator.ModeKeys = modekeys
    estimator.Exporter = type("Exporter", (), {})
    sys.modules[estimator.__name__] = estimator
    tf2.estimator = tf.estimator = estimator
    tf2.flags = absl.flags
    return tf


def define_flags(task: str, filters_factor: int):
    from absl import flags

    F = flags.FLAGS
    for kind, name, default in [
        ("string", "architecture", "resnet50"), ("integer", "filters_factor", filters_factor),
        ("float", "weight_decay", 1e-3), ("string", "serving_input_shape", "None,None,None,3"),
        ("bool", "polyak_averaging", task == "rotation_vat"), ("integer", "triplet_embed_dim", 1000),
        ("string", "dataset", "imagenet"), ("string", "task", task),
        ("string", "tpu_name", None),
    ]:
        if name in F:
            F[name].value = default
        else:
            getattr(flags, f"DEFINE_{kind}")(name, default, "")
    if not F.is_parsed():
        F(["make_tfhub_fixtures"])


def release_checkout(path: str) -> Path:
    p = Path(path)
    if (p / "models" / "resnet.py").is_file():
        return p
    if (p / "HEAD").is_file():  # a bare git dir (e.g. a mirror): export its tree
        out = Path(tempfile.mkdtemp(prefix="s4l-release-"))
        tar = subprocess.run(["git", f"--git-dir={p}", "archive", "HEAD"], check=True,
                             capture_output=True).stdout
        subprocess.run(["tar", "x", "-C", str(out)], input=tar, check=True)
        return out
    raise SystemExit(f"{p} is neither a checkout of google-research/s4l nor its git dir")


def random_value(name: str, shape, rng, np, grid: float):
    """A value for one variable, on a coarse grid (compressible) and numerically tame."""
    def q(x):
        return (np.round(x / grid) * grid).astype(np.float32)

    if name.endswith("moving_variance"):
        return q(rng.uniform(0.5, 2.0, shape))
    if name.endswith("gamma"):
        return q(rng.uniform(0.5, 1.5, shape))
    if name.endswith(("beta", "moving_mean", "bias")):
        return q(rng.uniform(-0.25, 0.25, shape))
    fan_in = int(np.prod(shape[:-1]))
    fan_out = int(shape[-1]) * (int(np.prod(shape[:-2])) if len(shape) > 2 else 1)
    lim = float(np.sqrt(6.0 / (fan_in + fan_out)))
    # Ternary kernels {-s, 0, s} with s a power of two near the glorot limit: three bit patterns
    # per tensor compress ~10x, and the network still mixes every input.
    step = 2.0 ** np.round(np.log2(lim))
    return (rng.integers(-1, 2, shape) * step).astype(np.float32)


def build_module(tf, release: Path, family: str, filters_factor: int, out_dir: Path, seed: int,
                 grid: float) -> dict:
    import importlib

    import numpy as np

    task = FAMILIES[family]
    define_flags(task, filters_factor)
    sys.path.insert(0, str(release))
    try:
        import tpu_ops
        tpu_ops.tf = tf  # the release wrote it against TF1's `import tensorflow as tf`
        trainer = importlib.import_module("trainer")
        mod = importlib.import_module(f"semi_supervised.{task}")
        captured = {}
        make = trainer.make_hub_predictor

        def capture(fn):
            captured["module"] = make(fn)
            return captured["module"]

        trainer.make_hub_predictor = capture
        with tf.Graph().as_default():
            img = tf.placeholder(tf.float32, [None, None, None, 3])
            mod.model_fn({"image": img}, tf.estimator.ModeKeys.PREDICT)
            module = captured["module"]
            trainer.make_hub_predictor = make
            rng = np.random.default_rng(seed)
            with tf.Session() as sess:
                sess.run(tf.global_variables_initializer())
                names = sorted(module.variable_map)
                for name in names:
                    var = module.variable_map[name]
                    var = var[0] if isinstance(var, list) else var
                    var.load(random_value(name, var.shape.as_list(), rng, np, grid), sess)
                if out_dir.exists():
                    shutil.rmtree(out_dir)
                module.export(str(out_dir), sess)
    finally:
        sys.path.remove(str(release))
    return {"variables": len(names), "task": task}


def run_module(tf, module_dir: Path, images):
    """TF's outputs of the exported module, loaded back by tensorflow_hub in a fresh graph."""
    import numpy as np
    import tensorflow_hub as hub

    x = images.astype(np.float32) / 127.5 - 1.0  # the release scales in its input pipeline
    with tf.Graph().as_default():
        m = hub.Module(str(module_dir), trainable=False)
        ph = tf.placeholder(tf.float32, [None, None, None, 3])
        rep = m(ph, signature="representation", as_dict=True)
        default = m(ph)
        wanted = {k: v for k, v in rep.items()
                  if k in ("pre_logits", "classes", "rotations", "embeddings")}
        with tf.Session() as sess:
            sess.run(tf.global_variables_initializer())
            got = sess.run({**wanted, "default": default}, {ph: x})
    out = {k: np.asarray(v, np.float32) for k, v in got.items()}
    out["pre_logits"] = out["pre_logits"].reshape(len(images), -1)
    out["representation_keys"] = np.array(sorted(rep), dtype="U64")
    return out


def fixed_images(np, n: int = 2, size: int = 224):
    """Smooth, deterministic uint8 images (they compress; no RNG stream to depend on)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    imgs = []
    for i in range(n):
        r = 128 + 100 * np.sin(6.0 * xx + 2 * i) * np.cos(4.0 * yy)
        g = 255 * ((xx + yy * (i + 1)) % 1.0)
        b = 255 * (((xx - 0.5) ** 2 + (yy - 0.5) ** 2) < 0.1 + 0.05 * i)
        imgs.append(np.stack([r, g, b], -1))
    return np.clip(np.round(np.stack(imgs)), 0, 255).astype(np.uint8)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--release", required=True, help="checkout (or git dir) of google-research/s4l")
    ap.add_argument("--out", default=str(REPO / "tests" / "fixtures" / "tfhub"))
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--filters-factor", type=int, default=1,
                    help="the release's width knob (an int: a float one adds a projection to every unit): 4 = standard, 16 = 4x (MOAM); 1 (root 16) for fixtures")
    ap.add_argument("--grid", type=float, default=1 / 64, help="rounding of BN values/biases")
    ap.add_argument("--seed", type=int, default=26)
    ap.add_argument("--no-outputs", action="store_true", help="only write the modules")
    ap.add_argument("--no-pack", action="store_true", help="leave module dirs, no .tgz")
    args = ap.parse_args()

    import numpy as np

    tf = install_shims()
    import tensorflow_hub as hub
    release = release_checkout(args.release)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images = fixed_images(np)
    if not args.no_outputs:
        np.savez_compressed(out / "inputs.npz", images=images)
    manifest = {"release_commit": RELEASE_COMMIT, "tensorflow": tf.__version__,
                "tensorflow_hub": hub.__version__, "filters_factor": args.filters_factor,
                "seed": args.seed, "families": {}}
    for i, family in enumerate(args.families.split(",")):
        t0 = time.time()
        mdir = out / family
        info = build_module(tf, release, family, args.filters_factor, mdir, args.seed + i, args.grid)
        info["export_s"] = round(time.time() - t0, 1)
        if not args.no_outputs:
            res = run_module(tf, mdir, images)
            keys = res.pop("representation_keys")
            np.savez_compressed(out / f"{family}.outputs.npz", **res)
            info["representation_signature"] = [str(k) for k in keys]
        if not args.no_pack:
            with tarfile.open(out / f"{family}.tgz", "w:gz") as tar:
                for p in sorted(mdir.rglob("*")):
                    tar.add(p, arcname=str(p.relative_to(out)), recursive=False)
            shutil.rmtree(mdir)
        manifest["families"][family] = info
        print(family, json.dumps(info)[:300], flush=True)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
