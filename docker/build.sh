#!/usr/bin/env bash
# Build every s4l image on a machine with no image registry: `make images` runs this.
#
#   docker/build.sh [images]   engine + local base + wheelhouses + serve, serve-gpu, train + report
#   docker/build.sh build      the same without the report (the tests' session fixture runs this)
#   docker/build.sh engine     start (or reuse) the engine only; prints `export DOCKER_HOST=...`
#   docker/build.sh stop       stop the private engine this script started (by its recorded PID)
#   docker/build.sh clean      remove the images, the local base, the wheelhouses and the build cache
#
# Engine: $DOCKER_HOST (or the default socket) when it answers; otherwise, as root, a private
# dockerd (--iptables=false --ip6tables=false --bridge=none) with its socket, data root and exec
# root under $S4L_DOCKER_STATE (default /var/tmp/s4l-docker); its PID goes to $STATE/dockerd.pid.
# Base: Debian bookworm from debootstrap (its python3 is 3.11), imported as s4l-base:<hash of the
# package list>, so it is made once per package list. Wheels: `pip wheel` on the host into a
# wheelhouse per image (keyed by the hash of its requirements), installed in the build with
# `--no-index` (PIP_OFFLINE=1): the build itself needs no network.
# Users with registry access need none of this: `docker build -f docker/serve.Dockerfile .`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STATE=${S4L_DOCKER_STATE:-/var/tmp/s4l-docker}
HOSTPY=${S4L_HOST_PYTHON:-python3.11}
BASE_PACKAGES="python3,python3-venv,libgomp1,passwd,ca-certificates"
SUITE=bookworm
ORT_GPU=${S4L_ORT_GPU:-"onnxruntime-gpu>=1.19,<1.27"}  # CUDA 12 builds, as in serve-gpu.Dockerfile
export DOCKER_BUILDKIT=0
mkdir -p "$STATE"
TIMINGS=$(mktemp)
trap 'rm -f "$TIMINGS"' EXIT

step() {  # step NAME CMD...: run, print its duration, record it
    local name=$1; shift
    echo "==> $name"
    local t0 t1
    t0=$(date +%s.%N)
    "$@"
    t1=$(date +%s.%N)
    local dt
    dt=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}')
    echo "<== $name: ${dt} s"
    echo "$name $dt" >>"$TIMINGS"
}

quiet() { "$@" >/dev/null; }

engine_ok() { docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

engine() {
    if [ -z "${DOCKER_HOST:-}" ] && [ -S "$STATE/docker.sock" ]; then
        export DOCKER_HOST="unix://$STATE/docker.sock"
    fi
    if engine_ok; then
        echo "engine: reusing ${DOCKER_HOST:-the default socket}"
        return 0
    fi
    command -v dockerd >/dev/null || { echo "error: no engine answers and dockerd is not installed (apt-get install docker.io)" >&2; return 1; }
    [ "$(id -u)" = 0 ] || { echo "error: no engine answers and starting dockerd needs root" >&2; return 1; }
    export DOCKER_HOST="unix://$STATE/docker.sock"
    mkdir -p "$STATE/data" "$STATE/exec"
    rm -f "$STATE/docker.sock"
    # setsid: the daemon outlives this script and is stopped by `build.sh stop` (its PID).
    setsid dockerd --host "$DOCKER_HOST" --data-root "$STATE/data" --exec-root "$STATE/exec" \
        --pidfile "$STATE/dockerd.pid" --iptables=false --ip6tables=false --bridge=none \
        >"$STATE/dockerd.log" 2>&1 </dev/null &
    local i
    for i in $(seq 1 120); do
        engine_ok && { echo "engine: started dockerd (PID $(cat "$STATE/dockerd.pid"), $DOCKER_HOST)"; return 0; }
        sleep 0.5
    done
    echo "error: dockerd did not answer within 60 s; see $STATE/dockerd.log" >&2
    tail -5 "$STATE/dockerd.log" >&2
    return 1
}

stop_engine() {
    local pidf="$STATE/dockerd.pid"
    [ -f "$pidf" ] || { echo "no private engine recorded in $pidf"; return 0; }
    local pid; pid=$(cat "$pidf")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        echo "engine: stopped dockerd (PID $pid)"
    fi
    rm -f "$pidf"
}

base_tag() {
    local h; h=$(printf '%s %s minbase\n' "$SUITE" "$BASE_PACKAGES" | sha256sum | cut -c1-12)
    echo "s4l-base:$h"
}

make_base() {
    local tag; tag=$(base_tag)
    if docker image inspect "$tag" >/dev/null 2>&1; then echo "base: $tag cached"; return 0; fi
    command -v debootstrap >/dev/null || { echo "error: debootstrap is not installed (apt-get install debootstrap)" >&2; return 1; }
    local rootfs="$STATE/rootfs.$$"
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$rootfs" >"$STATE/debootstrap.log" 2>&1 \
        || { tail -5 "$STATE/debootstrap.log" >&2; return 1; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import -c 'ENV LANG=C.UTF-8' - "$tag" >/dev/null
    rm -rf "$rootfs"
    echo "base: made $tag"
}

# The requirements of one image, one per line (docker/requirements.py reads pyproject.toml).
reqs() {
    case $1 in
        serve) "$HOSTPY" docker/requirements.py serve openvino ;;  # the Dockerfile's EXTRAS
        serve-gpu) "$HOSTPY" docker/requirements.py serve --without onnxruntime; echo "$ORT_GPU" ;;
        train) echo "torch==${S4L_TRAIN_TORCH:-2.13.0}"; "$HOSTPY" docker/requirements.py train eval export --without torchvision ;;
    esac
    # s4l's own build backend, for `pip install --no-index .` in the image.
    echo "setuptools>=68"; echo "wheel"
}

wheelhouse() {  # wheelhouse IMAGE -> prints the directory
    local img=$1 h dir
    h=$( (reqs "$img"; "$HOSTPY" -c 'import sys; print(sys.version_info[:2])') | sha256sum | cut -c1-12)
    dir="$STATE/wheels/$img-$h"
    if [ ! -f "$dir/.complete" ]; then
        rm -rf "$dir"; mkdir -p "$dir"
        reqs "$img" >"$dir/requirements.txt"
        "$HOSTPY" -m pip wheel -q --wheel-dir "$dir" -r "$dir/requirements.txt" >&2
        touch "$dir/.complete"
    fi
    echo "$dir"
}

# A build context per image: the tracked sources plus that image's wheels (the classic builder
# sends the whole context, so the serve build does not carry the train wheels).
context() {  # context IMAGE WHEELDIR -> prints the directory
    local ctx="$STATE/context/$1"
    rm -rf "$ctx"; mkdir -p "$ctx/docker/wheelhouse"
    git ls-files -z -co --exclude-standard pyproject.toml README.md s4l training evaluation service study docker \
        | xargs -0 cp --parents -t "$ctx"
    cp -l "$2"/*.whl "$ctx/docker/wheelhouse/" 2>/dev/null || cp "$2"/*.whl "$ctx/docker/wheelhouse/"
    echo "$ctx"
}

build_image() {  # build_image IMAGE [extra docker build args]
    local img=$1; shift
    local wh ctx
    wh=$(wheelhouse "$img")
    ctx=$(context "$img" "$wh")
    local log; log=$(mktemp)
    if ! docker build -q -f "$ctx/docker/$img.Dockerfile" -t "s4l-$img" \
        --build-arg BASE_IMAGE="$(base_tag)" --build-arg PIP_OFFLINE=1 "$@" "$ctx" >"$log" 2>&1; then
        cat "$log" >&2; rm -f "$log"; return 1
    fi
    rm -f "$log"
}

images() {
    local cold=cached
    docker image inspect "$(base_tag)" >/dev/null 2>&1 || cold=cold
    [ -n "${S4L_NO_CACHE:-}" ] && cold=cold
    local nc=(); [ -n "${S4L_NO_CACHE:-}" ] && nc=(--no-cache)
    step engine engine
    step base make_base
    step wheels-serve quiet wheelhouse serve
    step wheels-serve-gpu quiet wheelhouse serve-gpu
    step wheels-train quiet wheelhouse train
    step build-serve build_image serve "${nc[@]}"
    step build-serve-gpu build_image serve-gpu --build-arg ORT_GPU="$ORT_GPU" "${nc[@]}"
    step build-train build_image train --build-arg TORCH="torch==${S4L_TRAIN_TORCH:-2.13.0}" \
        --build-arg WITHOUT=torchvision "${nc[@]}"
    if [ -z "${S4L_BUILD_ONLY:-}" ]; then
        cp "$TIMINGS" "$STATE/timings-$cold.txt"
        step report report
    fi
    echo "export DOCKER_HOST=$DOCKER_HOST"
}

report() { "$HOSTPY" docker/report.py --state "$STATE" --base "$(base_tag)"; }

clean() {
    engine
    docker rm -f $(docker ps -aq) >/dev/null 2>&1 || true
    docker image rm -f s4l-serve s4l-serve-gpu s4l-train "$(base_tag)" >/dev/null 2>&1 || true
    docker image prune -f >/dev/null
    docker builder prune -af >/dev/null 2>&1 || true
    rm -rf "$STATE/wheels" "$STATE/context"
    echo "clean: images, base, wheelhouses and build cache removed"
}

case ${1:-images} in
    engine) engine; echo "export DOCKER_HOST=$DOCKER_HOST" ;;
    stop) stop_engine ;;
    base) engine; make_base; base_tag ;;
    images) images ;;
    build) S4L_BUILD_ONLY=1 images ;;
    report) engine; report ;;
    clean) clean ;;
    *) echo "usage: $0 [images|engine|stop|base|report|clean]" >&2; exit 2 ;;
esac
