"""`s4l demo` / `make demo`: the whole system end to end on the built-in digits dataset.

Each step runs the same `s4l` command a user would type (so the demo exercises the documented
commands), in its own process, into one output folder:

1. train S4L-Rotation and a supervised baseline on builtin:digits with 10% of the labels;
2. extract features of the test split to HDF5 and fit the linear probe on them;
3. export the S4L model to ONNX (checked against torch at export);
4. start the HTTP server on a free local port with the probe's head served next to the model
   (`--head digits-probe=...`) and the train-split features as a /search gallery, send held-out
   digit images to /embed, /classify (the model's own head), /classify?head=digits-probe&head=model
   (both heads, one backbone run) and /search as a real client, list GET /heads, check /readyz
   and /metrics, stop the server;
5. print a summary table and the path of every artifact.

A second run reuses every finished artifact (training resumes into a finished workdir, which
returns at once). Any failing step stops the demo with its name and a non-zero exit code.
Torch-free at import time (docs/contracts.md "The s4l command").
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from s4l.errors import UserError
from s4l.io import atomic_write_json

HELP = "run the whole system end to end on the built-in digits dataset (train, probe, export, serve)"

DATA = "builtin:digits"
LABEL_FRACTION = 0.1

# Small widths and schedules sized for a couple of minutes of training on 2 CPU cores. Both
# models get the same labels, width, image size, steps and labelled batch; S4L-Rotation also
# sees the unlabelled images (4 rotations of each). The numbers come from the CIFAR-10 presets
# (`s4l train --list-presets`), shrunk with ordinary `--set` overrides.
_COMMON = [
    "model.width=0.125",
    "model.stem=small",
    "data.image_size=32",
    "data.eval_resize=32",
    "data.eval_split=test",
    "data.val_per_class=5",
    "data.workers=0",
    "data.eval_batch_size=128",
    "optim.batch_size=32",
    "optim.lr=0.1",
    "log_every_steps=20",
]
# 60 epochs of the 140 labelled images = 240 steps (about 3.5 min for S4L-Rotation on 2 cores).
_SCHEDULE = ["optim.warmup_epochs=2", "optim.decay_epochs=48,56", "optim.total_epochs=60",
             "eval.every_epochs=20", "checkpoint.every_epochs=20"]
# --smoke: the same pipeline in seconds (tests/test_demo.py runs it so the demo cannot rot).
_SMOKE_SCHEDULE = ["optim.warmup_epochs=0.5", "optim.decay_epochs=1", "optim.total_epochs=1",
                   "eval.every_epochs=1", "checkpoint.every_epochs=1", "model.width=0.0625",
                   "data.image_size=16", "data.eval_resize=16"]
PRESETS = {"s4l-rotation": "cifar10-s4l-rotation-10pct", "supervised": "cifar10-supervised-10pct"}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    parser.add_argument("--fresh", action="store_true", help="delete the output folder first")
    parser.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    parser.add_argument("--smoke", action="store_true",
                        help="a seconds-long run of the same steps with a tiny schedule (tests)")


class StepFailed(UserError):
    pass


def _banner(n: int, title: str) -> None:
    print(f"\n=== step {n}/5: {title} ===", flush=True)


def _s4l(*args: str, log: Path | None = None) -> None:
    """Run `s4l ARGS` in a child process; its output goes to the terminal (and a log)."""
    cmd = [sys.executable, "-m", "s4l.cli", *args]
    print("$ s4l " + " ".join(args), flush=True)
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise StepFailed(f"`s4l {args[0]}` failed with exit code {proc.returncode}")


def _read_final_metrics(workdir: Path) -> dict[str, Any]:
    path = workdir / "final_metrics.json"
    if not path.exists():
        raise StepFailed(f"training finished without writing {path}")
    return json.loads(path.read_text())


def _pct(m: dict[str, Any], key: str) -> str:
    """A percentage metric of a run (the trainer reports accuracies in percent)."""
    v = m.get(key)
    return f"{v:.1f}%" if isinstance(v, (int, float)) else "n/a"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(method: str, url: str, body: bytes | None = None, headers: dict | None = None):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _multipart(files: list[tuple[str, bytes, str]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, data, ctype in files:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            f"Content-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n"
        )
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _sample_images(out: Path, n: int = 4) -> list[tuple[Path, str]]:
    """Write n held-out test digits as PNG files, as a user would have them on disk."""
    from s4l.datasets import open_source

    src = open_source(DATA, "test")
    folder = out / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    picked = []
    step = max(1, len(src) // n)
    for i in range(0, step * n, step):
        path = folder / f"test_{i:04d}_true_{src.classes[src.label(i)]}.png"
        if not path.exists():
            src.load(i).save(path)
        picked.append((path, src.classes[src.label(i)]))
    return picked


def _search_gallery(base: str, samples: list[tuple[Path, str]]) -> str:
    """POST /search with the held-out images against the train-split gallery; '<n>/<m>' whose
    nearest train image has the same label."""
    body, ctype = _multipart([(p.name, p.read_bytes(), "image/png") for p, _ in samples])
    status, raw = _http("POST", base + "/search?top_k=3&gallery=train", body, {"Content-Type": ctype})
    if status != 200:
        raise StepFailed(f"POST /search answered {status}: {raw[:300]!r}")
    print("POST /search (same images, gallery = train-split features, top_k=3) -> 200:")
    same = 0
    for (path, truth), res in zip(samples, json.loads(raw)["results"]):
        if "error" in res:
            raise StepFailed(f"/search failed on {path.name}: {res['error']}")
        near = ", ".join(f"{m['path']} ({m['class_name']}) {m['score']:.3f}" for m in res["matches"])
        same += res["matches"][0]["class_name"] == truth
        print(f"  {path.name:28s} nearest: {near}")
    return f"{same}/{len(samples)}"


PROBE_HEAD = "digits-probe"


def _serve_and_query(model: Path, out: Path, port: int, head: Path | None = None,
                     gallery: Path | None = None) -> dict[str, Any]:
    port = port or _free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = out / "server.log"
    env = dict(os.environ)
    with open(log_path, "wb") as log:  # not atomic: the server's log, written as it runs
        proc = subprocess.Popen(
            [sys.executable, "-m", "s4l.cli", "serve", "--model", str(model), "--host",
             "127.0.0.1", "--port", str(port),
             *(["--head", f"{PROBE_HEAD}={head}"] if head else []),
             *(["--gallery", f"train={gallery}"] if gallery else [])],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
    head_arg = (f" --head {PROBE_HEAD}={head}" if head else "") + \
        (f" --gallery train={gallery}" if gallery else "")
    print(f"$ s4l serve --model {model}{head_arg} --port {port}   (log: {log_path})", flush=True)
    try:
        deadline = time.monotonic() + 120
        ready: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise StepFailed(f"the server exited with code {proc.returncode}; see {log_path}")
            try:
                status, body = _http("GET", base + "/readyz")
                if status == 200:
                    ready = json.loads(body)
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.3)
        else:
            raise StepFailed(f"the server was not ready within 120 s; see {log_path}")
        print(f"GET /readyz -> 200 {json.dumps(ready)}")

        samples = _sample_images(out)
        files = [(p.name, p.read_bytes(), "image/png") for p, _ in samples]
        body, ctype = _multipart(files)
        status, raw = _http("POST", base + "/embed", body, {"Content-Type": ctype})
        if status != 200:
            raise StepFailed(f"POST /embed answered {status}: {raw[:300]!r}")
        embed = json.loads(raw)
        dims = [len(r["embedding"]) for r in embed["results"] if "embedding" in r]
        print(f"POST /embed ({len(files)} PNG files, multipart) -> 200: dim {embed['dim']}, "
              f"{len(dims)} embeddings")
        if len(dims) != len(files) or any(d != embed["dim"] for d in dims):
            raise StepFailed(f"/embed returned {embed['results']!r:.300}")

        payload = json.dumps({
            "images": [base64.b64encode(p.read_bytes()).decode() for p, _ in samples],
        }).encode()
        status, raw = _http("POST", base + "/classify?top_k=3", payload, {"Content-Type": "application/json"})
        if status != 200:
            raise StepFailed(f"POST /classify answered {status}: {raw[:300]!r}")
        results = json.loads(raw)["results"]
        print("POST /classify (same images, JSON base64, top_k=3) -> 200:")
        correct = 0
        for (path, truth), res in zip(samples, results):
            if "error" in res:
                raise StepFailed(f"/classify failed on {path.name}: {res['error']}")
            top = ", ".join(f"{t['label']} {t['score']:.2f}" for t in res["top_k"])
            correct += res["top_k"][0]["label"] == truth
            print(f"  {path.name:28s} true {truth}  top-3: {top}")

        probe_correct = None
        if head is not None:
            status, raw = _http("GET", base + "/heads")
            listed = json.loads(raw)
            if status != 200:
                raise StepFailed(f"GET /heads answered {status}: {raw[:300]!r}")
            print(f"GET /heads -> 200: default {listed['default']!r}; " + "; ".join(
                f"{h['name']} ({h['source']}, {h['num_classes']} classes"
                + (f", val top-1 {h['metrics']['top1']:.1f}%" if h["metrics"].get("top1") is not None else "")
                + ")" for h in listed["heads"]))
            status, raw = _http("POST", base + f"/classify?head={PROBE_HEAD}&head=model&top_k=1",
                                payload, {"Content-Type": "application/json"})
            if status != 200:
                raise StepFailed(f"POST /classify?head=... answered {status}: {raw[:300]!r}")
            both = json.loads(raw)["results"]
            print(f"POST /classify?head={PROBE_HEAD}&head=model (one backbone run per image) -> 200:")
            probe_correct = 0
            for (path, truth), res in zip(samples, both):
                if "error" in res:
                    raise StepFailed(f"/classify?head= failed on {path.name}: {res['error']}")
                p = res["heads"][PROBE_HEAD]["top_k"][0]
                m = res["heads"]["model"]["top_k"][0]
                probe_correct += p["label"] == truth
                print(f"  {path.name:28s} true {truth}  probe head: {p['label']} {p['score']:.2f}"
                      f"  model head: {m['label']} {m['score']:.2f}")

        searched = _search_gallery(base, samples) if gallery else None

        status, raw = _http("GET", base + "/metrics")
        text = raw.decode(errors="replace")
        if status != 200 or "s4l_" not in text:
            raise StepFailed(f"GET /metrics answered {status} without s4l metrics")
        images = [ln for ln in text.splitlines() if ln.startswith("s4l_images_total")]
        print(f"GET /metrics -> 200 ({len(text.splitlines())} lines)")
        for ln in images:
            print(f"  {ln}")
        return {"port": port, "served_top1": f"{correct}/{len(samples)}", "dim": embed["dim"],
                "served_probe_head_top1": (f"{probe_correct}/{len(samples)}"
                                           if probe_correct is not None else None),
                "search_nearest_same_label": searched,
                "provider": ready.get("provider") or ready.get("execution_provider")}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        print("server stopped")


def main(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    timings: dict[str, float] = {}

    def timed(name: str, fn, *a):
        t = time.monotonic()
        r = fn(*a)
        timings[name] = time.monotonic() - t
        return r

    _banner(1, f"train S4L-Rotation and a supervised baseline on {DATA} ({LABEL_FRACTION:.0%} labels)")
    results: dict[str, dict[str, Any]] = {}
    sets = _COMMON + (_SMOKE_SCHEDULE if args.smoke else _SCHEDULE)
    for name, preset in PRESETS.items():
        workdir = out / name
        argv = ["train", "--preset", preset, "--data", DATA, "--workdir", str(workdir),
                "--label-fraction", str(LABEL_FRACTION)]
        for s in sets:
            argv += ["--set", s]
        timed(f"train {name}", _s4l, *argv)
        results[name] = _read_final_metrics(workdir)
    print("\ntest accuracy on the digits test split (same 10% labels, same steps):")
    print(f"  {'model':14s} {'top-1':>7s} {'top-5':>7s}  {'top-1 rotation-averaged':>24s}")
    for name, m in results.items():
        print(f"  {name:14s} {_pct(m, 'eval/top1'):>7s} {_pct(m, 'eval/top5'):>7s}  "
              f"{_pct(m, 'eval/top1_rotation_averaged'):>24s}")

    ckpt = out / "s4l-rotation" / "checkpoint.pt"
    _banner(2, "extract test-split features to HDF5 and fit the linear probe")
    feats = {}
    for split in ("train", "test"):
        feats[split] = out / f"features_{split}.h5"
        if not feats[split].exists():
            timed(f"extract {split}", _s4l, "extract", "--model", str(ckpt), "--data", DATA,
                  "--split", split, "--out", str(feats[split]))
        else:
            print(f"reusing {feats[split]}")
    probe_dir = out / "probe"
    report_path = probe_dir / "report.json"
    if not report_path.exists() or not _probe_head(json.loads(report_path.read_text())):
        timed("probe", _s4l, "probe", "--train", str(feats["train"]), "--val",
              str(feats["test"]), "--out", str(probe_dir), "--overwrite",
              "--schedules", "short=2,long=3" if args.smoke else "short=10,long=60",
              "--no-progress")
    probe = json.loads((probe_dir / "report.json").read_text())

    _banner(3, "export the S4L model to ONNX (checked against torch)")
    onnx_path = out / "model.onnx"
    if not onnx_path.exists():
        timed("export", _s4l, "export", "--checkpoint", str(ckpt), "--out", str(onnx_path))
    else:
        print(f"reusing {onnx_path}")

    _banner(4, "serve it over HTTP and query it as a client would")
    head = _probe_head(probe)
    served = timed("serve", _serve_and_query, onnx_path, out, args.port, head, feats["train"])

    _banner(5, "summary")
    rows = [
        ("S4L-Rotation test top-1", _pct(results["s4l-rotation"], "eval/top1")),
        ("supervised test top-1", _pct(results["supervised"], "eval/top1")),
        ("linear probe on S4L features, top-1", _pct({"v": _probe_top1(probe)}, "v")),
        ("served /classify correct (model head)", served["served_top1"]),
        ("served /classify correct (probe head)", served["served_probe_head_top1"] or "n/a"),
        ("/search nearest train image, same label", str(served["search_nearest_same_label"])),
        ("embedding dim", str(served["dim"])),
        ("total time", f"{time.monotonic() - t0:.0f} s"),
    ]
    width = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"  {k:<{width}s}  {v}")
    print("\nartifacts:")
    for label, path in [
        ("S4L-Rotation checkpoint", ckpt),
        ("supervised checkpoint", out / "supervised" / "checkpoint.pt"),
        ("features (train, test)", f"{feats['train']}, {feats['test']}"),
        ("probe report", probe_dir / "report.json"),
        ("probe head", head),
        ("learning curves", probe_dir / "learning_curves.png"),
        ("ONNX model", onnx_path),
        ("sample images", out / "samples"),
    ]:
        print(f"  {label:24s} {path}")
    print(f"\nserve the model: make serve   (or: s4l serve --model {onnx_path} "
          f"--head {PROBE_HEAD}={head})")
    atomic_write_json(out / "summary.json",
                      {"train": results, "probe_top1": _probe_top1(probe), "served": served,
                       "timings_s": timings, "total_s": time.monotonic() - t0},
                      indent=2, default=str)
    return 0


def _probe_head(report: dict[str, Any]) -> Path | None:
    """The scikit-learn head file `s4l probe` wrote (what the demo serves), if it exists."""
    for result in report.get("results", []):
        path = result.get("heads", {}).get("sklearn")
        if path and Path(path).exists():
            return Path(path)
    return None


def _probe_top1(report: dict[str, Any]) -> float | None:
    """scikit-learn L-BFGS top-1 of the (single) feature pair in a `s4l probe` report."""
    for result in report.get("results", []):
        top1 = result.get("sklearn", {}).get("top1")
        if isinstance(top1, (int, float)):
            return float(top1)
    return None
