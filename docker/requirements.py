"""Print the requirements of s4l's extras, one per line, from pyproject.toml (stdlib only).

    python3 docker/requirements.py serve                      # the serve extra
    python3 docker/requirements.py train eval export --without torchvision

Self-references (``s4l[train]``) are expanded; ``--without NAME`` drops a distribution (the CPU
train image leaves out torchvision: PyPI's build of it does not load beside a CPU torch). The
Dockerfiles and docker/build.sh use this so that the image and its wheelhouse ask for the same
packages as pyproject.toml.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def _name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def requirements(extras: list[str], without: set[str], pyproject: Path = PYPROJECT) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    out: list[str] = list(project.get("dependencies", []))
    seen: set[str] = set()
    todo = list(extras)
    while todo:
        extra = todo.pop(0)
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"error: pyproject.toml has no extra {extra!r}")
        seen.add(extra)
        for req in optional[extra]:
            m = re.fullmatch(r"s4l\[([\w,\s-]+)\]", req.strip())
            if m:
                todo += [e.strip() for e in m.group(1).split(",")]
            else:
                out.append(req)
    drop = {w.lower() for w in without}
    unique: list[str] = []
    for req in out:
        if _name(req) not in drop and req not in unique:
            unique.append(req)
    return unique


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("extras", nargs="+")
    ap.add_argument("--without", action="append", default=[], help="a distribution to leave out")
    args = ap.parse_args()
    without = {w for item in args.without for w in item.replace(",", " ").split()}
    print("\n".join(requirements(args.extras, without)))


if __name__ == "__main__":
    main()
