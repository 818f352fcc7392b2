"""The container images, built by docker/build.sh and run on a real engine (marker `docker`).

Skipped, with the reason shown, when no engine answers and none can be started (no docker CLI,
no dockerd, not root). The images are built once per session (the build is cached by content).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from support.net import free_port
from support.server import ServerProcess, export_tiny, jpeg_bytes

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "docker" / "build.sh"
STATE = Path(os.environ.get("S4L_DOCKER_STATE", "/var/tmp/s4l-docker"))

pytestmark = pytest.mark.docker


def _engine_answers(env: dict[str, str]) -> bool:
    try:
        return subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"], env=env,
                              capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def engine():
    """DOCKER_HOST of an answering engine: the caller's, or a private one started here."""
    if shutil.which("docker") is None:
        pytest.skip("no docker CLI (apt-get install docker.io to run the image tests)")
    env = dict(os.environ)
    if not env.get("DOCKER_HOST") and (STATE / "docker.sock").is_socket():
        env["DOCKER_HOST"] = f"unix://{STATE / 'docker.sock'}"
    started = False
    if not _engine_answers(env):
        if shutil.which("dockerd") is None or os.geteuid() != 0:
            pytest.skip("no container engine answers and none can be started here "
                        "(needs dockerd and root)")
        res = subprocess.run([str(BUILD), "engine"], env=env, capture_output=True, text=True,
                             timeout=120)
        if res.returncode != 0:
            pytest.skip(f"could not start a container engine: {res.stderr.strip()[-300:]}")
        env["DOCKER_HOST"] = f"unix://{STATE / 'docker.sock'}"
        started = True
    yield env
    if started:
        subprocess.run([str(BUILD), "stop"], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def images(engine):
    res = subprocess.run([str(BUILD), "build"], env=engine, capture_output=True, text=True,
                         timeout=3600)
    assert res.returncode == 0, f"docker/build.sh build failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    return engine


def docker(env, *args, timeout=120, check=True) -> subprocess.CompletedProcess:
    res = subprocess.run(["docker", *args], env=env, capture_output=True, text=True,
                         timeout=timeout)
    if check:
        assert res.returncode == 0, f"docker {' '.join(args)}: {res.stderr[-2000:]}"
    return res


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("images")
    d.chmod(0o755)
    m = export_tiny(d)
    m.chmod(0o644)
    return m


class Container:
    """A detached container on the host network with its own port."""

    def __init__(self, env, image, *args, model: Path | None = None, environ=(), opts=()):
        self.env = env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = ["run", "-d", "--network=host", "-e", f"S4L_PORT={self.port}",
               "-e", "OMP_NUM_THREADS=1", *opts]
        for kv in environ:
            cmd += ["-e", kv]
        if model is not None:
            cmd += ["-v", f"{model}:/models/model.onnx:ro"]
        self.id = docker(env, *cmd, image, *args).stdout.strip()

    def wait_ready(self, timeout=90.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            state = docker(self.env, "inspect", "-f", "{{.State.Running}}", self.id).stdout.strip()
            assert state == "true", f"container exited:\n{self.logs()}"
            time.sleep(0.1)
        raise AssertionError(f"not ready after {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        r = docker(self.env, "logs", self.id, check=False)
        return r.stdout + r.stderr

    def exec(self, *args, check=False):
        return docker(self.env, "exec", self.id, *args, check=check)

    def remove(self):
        docker(self.env, "rm", "-f", self.id, check=False)


def _post(url, blobs, path="/embed", params=None):
    files = [("files", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(blobs)]
    return httpx.post(url + path, files=files, params=params, timeout=60)


def _jpegs() -> list[bytes]:
    return [jpeg_bytes(size=(48 + 8 * i, 40 + 4 * i), seed=i) for i in range(4)]


# -- serve (CPU) ---------------------------------------------------------------------------------

def test_serve_image_matches_host_server_read_only_non_root_healthy(images, model):
    c = Container(images, "s4l-serve", model=model,
                  opts=["--read-only", "--tmpfs", "/tmp", "--health-interval=1s"])
    try:
        c.wait_ready()
        blobs = _jpegs()
        with ServerProcess(model) as host:
            for path in ("/embed", "/classify"):
                got = _post(c.url, blobs, path, {"top_k": 3} if path == "/classify" else None)
                want = _post(host.url, blobs, path, {"top_k": 3} if path == "/classify" else None)
                assert got.status_code == want.status_code == 200, got.text
                g, w = got.json()["results"], want.json()["results"]
                assert len(g) == len(w) == len(blobs)
                for a, b in zip(g, w):
                    if path == "/embed":
                        np.testing.assert_allclose(a["embedding"], b["embedding"], rtol=1e-5,
                                                   atol=1e-6)
                    else:
                        assert [x["label"] for x in a["top_k"]] == [x["label"] for x in b["top_k"]]
                        np.testing.assert_allclose([x["score"] for x in a["top_k"]],
                                                   [x["score"] for x in b["top_k"]], rtol=1e-5,
                                                   atol=1e-6)
        uid = c.exec("id", "-u", check=True).stdout.strip()
        assert uid != "0"
        torch = c.exec("python", "-c", "import torch")
        assert torch.returncode != 0 and "No module named 'torch'" in torch.stderr
        ro = c.exec("touch", "/opt/s4l/x")
        assert ro.returncode != 0 and "Read-only file system" in ro.stderr
        deadline = time.monotonic() + 60
        status = ""
        while time.monotonic() < deadline:
            status = docker(images, "inspect", "-f", "{{.State.Health.Status}}", c.id).stdout.strip()
            if status == "healthy":
                break
            time.sleep(0.5)
        assert status == "healthy", c.logs()
    finally:
        c.remove()


def test_serve_image_sigterm_finishes_in_flight_request(images, model):
    """SIGTERM arrives while a request's body is still being uploaded: the request completes."""
    c = Container(images, "s4l-serve", model=model)
    try:
        c.wait_ready()
        blob = jpeg_bytes(seed=5)
        b = "s4lboundary"
        body = (f'--{b}\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\n'
                f"Content-Type: image/jpeg\r\n\r\n").encode() + blob + f"\r\n--{b}--\r\n".encode()
        sent_half, go = threading.Event(), threading.Event()

        def slow_body():
            yield body[: len(body) // 2]
            sent_half.set()
            go.wait(30)
            yield body[len(body) // 2:]

        out = {}

        def client():
            out["r"] = httpx.post(c.url + "/embed", content=slow_body(), timeout=60,
                                  headers={"Content-Type": f"multipart/form-data; boundary={b}",
                                           "Content-Length": str(len(body))})

        t = threading.Thread(target=client)
        t.start()
        assert sent_half.wait(30)
        time.sleep(0.3)
        docker(images, "kill", "--signal", "TERM", c.id)
        deadline = time.monotonic() + 30
        while "Shutting down" not in c.logs():
            assert time.monotonic() < deadline, c.logs()
            time.sleep(0.05)
        go.set()  # the rest of the body, after the server has begun its shutdown
        t.join(60)
        r = out["r"]
        assert r.status_code == 200, r.text
        assert len(r.json()["results"][0]["embedding"]) > 0
        waited = docker(images, "wait", c.id, timeout=60).stdout.strip()
        assert waited in ("0", str(128 + 15)), c.logs()  # exited by itself, not killed (137)
        assert "Application shutdown complete" in c.logs()
    finally:
        c.remove()


def _bad_run(env, image, *args, volumes=(), environ=()):
    cmd = ["run", "--rm", "--network=host", "-e", f"S4L_PORT={free_port()}"]
    for v in volumes:
        cmd += ["-v", v]
    for kv in environ:
        cmd += ["-e", kv]
    return docker(env, *cmd, image, *args, timeout=90, check=False)


def _assert_one_line_error(res, needle):
    text = res.stdout + res.stderr
    assert res.returncode not in (0, None), text
    assert "Traceback" not in text, text
    # onnxruntime's own C++ log lines may precede it; s4l's is one line, without a traceback.
    errors = [ln for ln in text.splitlines() if ln.startswith("s4l serve: error:")]
    assert len(errors) == 1 and needle in errors[0], text


@pytest.mark.parametrize("case", ["no-model", "unreadable", "not-onnx", "cuda-on-cpu"])
def test_serve_image_bad_configuration_exits_with_one_line(images, model, tmp_path, case):
    tmp_path.chmod(0o755)
    volumes, environ, needle = [], [], ""
    if case == "no-model":
        needle = "/models/model.onnx does not exist"
    elif case == "unreadable":
        secret = tmp_path / "model.onnx"
        shutil.copy(model, secret)
        secret.chmod(0o600)  # owned by the host user; the container's user is another
        volumes, needle = [f"{secret}:/models/model.onnx:ro"], "not readable"
    elif case == "not-onnx":
        junk = tmp_path / "model.onnx"
        junk.write_text("this is not an ONNX model\n")
        junk.chmod(0o644)
        volumes, needle = [f"{junk}:/models/model.onnx:ro"], "cannot load"
    else:
        volumes, environ, needle = [f"{model}:/models/model.onnx:ro"], ["S4L_PROVIDER=cuda"], "cuda"
    _assert_one_line_error(_bad_run(images, "s4l-serve", volumes=volumes, environ=environ), needle)


# -- serve-gpu -----------------------------------------------------------------------------------

def test_serve_gpu_image_has_onnxruntime_gpu_and_refuses_cuda_without_gpu(images, model):
    probe = docker(images, "run", "--rm", "--entrypoint", "python", "s4l-serve-gpu", "-c",
                   "import importlib.metadata as m, onnxruntime as o; "
                   "print(m.version('onnxruntime-gpu'), o.get_available_providers())")
    assert "CUDAExecutionProvider" in probe.stdout, probe.stdout
    res = _bad_run(images, "s4l-serve-gpu", volumes=[f"{model}:/models/model.onnx:ro"])
    _assert_one_line_error(res, "cuda")


# -- train ---------------------------------------------------------------------------------------

TRAIN = ["--standalone", "--nproc_per_node=2", "-m", "s4l.cli", "train",
         "--preset", "s4l-rotation-10pct-smoke", "--data", "builtin:digits",
         "--workdir", "/work/runs/smoke", "--device", "cpu", "--no-progress",
         "--set", "optim.total_steps=12", "--set", "checkpoint.every_steps=2",
         "--set", "log_every_steps=1", "--set", "data.workers=0",
         "--set", "optim.warmup_epochs=0"]


def _train_container(env, workdir: Path, name: str) -> str:
    workdir.mkdir(parents=True, exist_ok=True)
    return docker(env, "create", "--name", name, "--network=host", "--ipc=host",
                  "-e", "OMP_NUM_THREADS=1", "-e", "PYTHONHASHSEED=0",
                  "-v", f"{workdir}:/work/runs", "s4l-train", *TRAIN).stdout.strip()


def _steps(workdir: Path) -> list[int]:
    import json
    try:
        lines = (workdir / "smoke" / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for ln in lines:
        with contextlib.suppress(json.JSONDecodeError):
            rec = json.loads(ln)
            if rec.get("kind") == "train":
                out.append(rec["step"])
    return out


def test_train_image_torchrun_two_processes_resume_export_serve(images, tmp_path):
    import torch

    from s4l.training.checkpoint import read_checkpoint

    tag = f"s4l-test-{os.getpid()}"
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = _train_container(images, ref_dir, f"{tag}-ref")
    run = _train_container(images, run_dir, f"{tag}-run")
    try:
        r = docker(images, "start", "-a", ref, timeout=900, check=False)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        # The same container, killed after its first checkpoint, then started again.
        docker(images, "start", run)
        deadline = time.monotonic() + 600
        while not any(s >= 5 for s in _steps(run_dir)):
            assert time.monotonic() < deadline, "no progress"
            running = docker(images, "inspect", "-f", "{{.State.Running}}", run).stdout.strip()
            assert running == "true", docker(images, "logs", run, check=False).stderr[-3000:]
            time.sleep(0.05)
        docker(images, "kill", run)
        killed_at = read_checkpoint(run_dir / "smoke" / "checkpoint.pt")["step"]
        assert 2 <= killed_at < 12
        r = docker(images, "start", "-a", run, timeout=900, check=False)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    finally:
        docker(images, "rm", "-f", ref, run, check=False)
    a = read_checkpoint(ref_dir / "smoke" / "checkpoint.pt")
    b = read_checkpoint(run_dir / "smoke" / "checkpoint.pt")
    assert a["step"] == b["step"] == 12
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"{k} differs after resume"
    assert a["data_state"] == b["data_state"]

    # The container's checkpoint, exported and served by the host's s4l.
    out = tmp_path / "smoke.onnx"
    subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-m", "s4l.cli", "export",
                    "--checkpoint", str(run_dir / "smoke" / "checkpoint.pt"), "--out", str(out)],
                   check=True, capture_output=True, timeout=300)
    with ServerProcess(out) as srv:
        r = _post(srv.url, [jpeg_bytes(seed=3)])
        assert r.status_code == 200
        assert np.isfinite(r.json()["results"][0]["embedding"]).all()


# -- compose -------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def compose(images):
    if shutil.which("docker-compose") is None:
        pytest.skip("no docker-compose (apt-get install docker-compose)")
    return images


def test_compose_config_validates_and_serve_starts(compose, model):
    port = free_port()
    env = {**compose, "S4L_MODELS": str(model.parent), "S4L_PUBLISH_PORT": str(port)}
    base = ["docker-compose", "-f", str(ROOT / "docker" / "compose.yaml"), "-p", f"s4lt{os.getpid()}"]
    cfg = subprocess.run([*base, "config"], env=env, capture_output=True, text=True, timeout=60)
    assert cfg.returncode == 0, cfg.stderr
    assert "s4l-serve" in cfg.stdout
    shutil.copy(model, model.parent / "model.onnx")
    (model.parent / "model.onnx").chmod(0o644)
    with _compose_serve(base, env, port):
        r = _post(f"http://127.0.0.1:{port}", [jpeg_bytes(seed=1)])
        assert r.status_code == 200


@contextlib.contextmanager
def _compose_serve(base: list[str], env: dict[str, str], port: int):
    """`docker compose up -d serve`, wait for /readyz (its logs on failure), `down` at the end."""
    up = subprocess.run([*base, "up", "-d", "--no-build", "serve"], env=env, capture_output=True,
                        text=True, timeout=180)
    try:
        assert up.returncode == 0, up.stderr
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        else:
            logs = subprocess.run([*base, "logs"], env=env, capture_output=True, text=True)
            raise AssertionError(f"compose serve not ready:\n{logs.stdout[-3000:]}")
        yield
    finally:
        subprocess.run([*base, "down", "-t", "5"], env=env, capture_output=True, timeout=120)


def test_documented_flow_export_then_compose_serve_as_the_image_user(compose, tmp_path):
    """docker/compose.yaml's two commands as a user runs them: `s4l export --out
    models/model.onnx` as the invoking user (nothing chmod'ed afterwards), then `docker compose
    up serve`: the folder mounted read-only into the image's own non-root user, which must be
    able to read the model (an export written with mkstemp's 0600 stopped it with "model file
    /models/model.onnx is not readable by this user (uid 999)")."""
    import sys

    from support.server import make_checkpoint

    project = tmp_path / "project"
    project.mkdir()
    ckpt = make_checkpoint(project / "checkpoint.pt")
    exe = Path(sys.executable).with_name("s4l")
    s4l = [str(exe)] if exe.exists() else [sys.executable, "-m", "s4l.cli"]
    # The login default umask (022): what the documented flow assumes of the user's shell.
    res = subprocess.run([*s4l, "export", "--checkpoint", str(ckpt), "--out", "models/model.onnx"],
                         cwd=project, capture_output=True, text=True, timeout=300,
                         preexec_fn=lambda: os.umask(0o022))
    assert res.returncode == 0, res.stderr[-3000:]
    model = project / "models" / "model.onnx"
    assert model.stat().st_uid == os.getuid()

    port = free_port()
    env = {**compose, "S4L_MODELS": str(model.parent), "S4L_PUBLISH_PORT": str(port)}
    base = ["docker-compose", "-f", str(ROOT / "docker" / "compose.yaml"),
            "-p", f"s4ldoc{os.getpid()}"]
    with _compose_serve(base, env, port):
        who = subprocess.run([*base, "exec", "-T", "serve", "sh", "-c",
                              "id -u; stat -c %u /models/model.onnx; touch /models/x"],
                             env=env, capture_output=True, text=True, timeout=60)
        uid, owner = who.stdout.split()[:2]
        assert uid != "0" and uid != owner, who.stdout  # not the file's owner: "other" must read
        assert "Read-only file system" in who.stderr, who.stderr  # the folder is mounted :ro
        r = _post(f"http://127.0.0.1:{port}", _jpegs())
        assert r.status_code == 200, r.text
        embs = [x["embedding"] for x in r.json()["results"]]
        assert len(embs) == 4 and all(len(e) == len(embs[0]) > 0 for e in embs)
        assert np.isfinite(np.array(embs)).all()
    assert model.stat().st_mode & 0o777 == 0o644  # what a plain open() gives under umask 022
