"""The package layout, the import boundaries and the `s4l` command's surface."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from s4l import __version__
from s4l.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
MAPPING = PYPROJECT["tool"]["setuptools"]["package-dir"]


def _packages_on_disk() -> set[str]:
    found = set()
    for pkg, folder in MAPPING.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            if any(part.startswith((".", "_")) for part in rel.parts):
                continue
            found.add(".".join((pkg, *rel.parts)) if rel.parts else pkg)
    return found


def test_package_list_matches_folders():
    assert set(PYPROJECT["tool"]["setuptools"]["packages"]) == _packages_on_disk()
    assert MAPPING == {
        "s4l": "s4l",
        "s4l.training": "training",
        "s4l.evaluation": "evaluation",
        "s4l.service": "service",
        "s4l.study": "study",
    }


@pytest.mark.parametrize("dockerfile", ["serve.Dockerfile", "serve-gpu.Dockerfile",
                                        "train.Dockerfile"])
def test_every_image_copies_every_package_folder(dockerfile):
    """An image installs the whole distribution: a package folder missing from its COPY lines
    (or from build.sh's build context) fails `pip install .` inside the build (study/ once did)."""
    text = (ROOT / "docker" / dockerfile).read_text()
    context = next(line for line in (ROOT / "docker" / "build.sh").read_text().splitlines()
                   if "git ls-files" in line)
    for folder in MAPPING.values():
        assert f"COPY {folder} ./{folder}" in text, (dockerfile, folder)
        assert f" {folder} " in context, folder


def test_every_python_file_is_inside_a_package():
    for _pkg, folder in MAPPING.items():
        for py in (ROOT / folder).rglob("*.py"):
            assert (py.parent / "__init__.py").exists(), f"{py} is not in a package"


def test_serve_extra_has_no_torch():
    serve = PYPROJECT["project"]["optional-dependencies"]["serve"]
    assert not [d for d in serve if d.lower().startswith(("torch", "s4l["))]


def test_ruff_bans_bare_top_level_imports(tmp_path):
    ruff = Path(sys.executable).with_name("ruff")
    if not ruff.exists():
        pytest.skip("ruff not installed in this environment")
    bad = tmp_path / "bad.py"
    bad.write_text("import training\nfrom service import app\nimport evaluation.probe\n")
    out = subprocess.run(
        [str(ruff), "check", "--config", str(ROOT / "pyproject.toml"), "--select", "TID251", str(bad)],
        capture_output=True, text=True,
    )
    assert out.returncode != 0
    for name in ("training", "service", "evaluation"):
        assert f"`{name}` is banned" in out.stdout or name in out.stdout
    assert out.stdout.count("TID251") == 3, out.stdout


def test_the_repository_passes_ruff():
    ruff = Path(sys.executable).with_name("ruff")
    if not ruff.exists():
        pytest.skip("ruff not installed in this environment")
    out = subprocess.run([str(ruff), "check", str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:]


def _imports_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print(' '.join(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )
    return set(out.stdout.split())


def test_core_and_cli_do_not_import_torch():
    mods = _imports_after("import s4l, s4l.imaging, s4l.errors, s4l.cli")
    assert "torch" not in mods


def test_server_modules_do_not_import_torch():
    server = sorted(
        f"s4l.service.{p.stem}" for p in (ROOT / "service").glob("*.py")
        if p.stem not in ("__init__", "export", "cmd_export")
    )
    if not server:
        pytest.skip("no server modules yet")
    mods = _imports_after("\n".join(f"import {m}" for m in server))
    assert "torch" not in mods, f"importing {server} pulled in torch"


def test_command_modules_import_without_torch():
    mods = _imports_after("\n".join(
        f"import importlib.util as u\nif u.find_spec('{m}'): __import__('{m}')" for m in COMMANDS.values()
    ))
    assert "torch" not in mods, "a command module imports torch at top level"


def test_cli_version_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert __version__ in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    for name in COMMANDS:
        assert name in help_text


def test_cli_unknown_command_fails(capsys):
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2


def test_console_script_runs():
    exe = Path(sys.executable).with_name("s4l")
    if not exe.exists():
        pytest.skip("s4l console script not installed")
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and __version__ in out.stdout
