"""The import boundaries GUIDE.md names, read from the source with an AST walk (imports inside
functions count): the server never imports torch, the torch-free core ``s4l/`` imports none of
the parts, nothing imports the top-level folders by their bare names, and the ``serve`` extra
stays torch-free. A static check sees imports a runtime check misses (those inside functions that
a test never calls); tests/test_packaging.py checks the same at runtime.
"""

from __future__ import annotations

import ast
import functools
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# The distribution's packages and the folders they come from (setuptools package-dir).
FOLDERS = {pkg: ROOT / folder for pkg, folder in PYPROJECT["tool"]["setuptools"]["package-dir"].items()}
PARTS = ("training", "evaluation", "service", "study")
# The service's build step (`s4l export` and its int8 and head-baking options), which may import
# torch; every other module in service/ is the server.
SERVICE_BUILD_STEPS = {"export.py", "cmd_export.py", "quantize.py", "bake_head.py"}
# s4l/ files that import a part today, each a known debt with the issue that removes it. The
# test fails for any file not listed here, and for a listed file that no longer needs its entry.
CORE_KNOWN_EXCEPTIONS: dict[str, str] = {}
SOURCE_DIRS = ("s4l", "training", "evaluation", "service", "study", "tests", "benchmarks", "experiments",
               "docker")


def _module_name(path: Path) -> str:
    for pkg, folder in FOLDERS.items():
        if path.is_relative_to(folder):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            return ".".join([pkg, *parts])
    raise ValueError(f"{path} is not in the distribution")


def _module_file(name: str) -> Path | None:
    """The file of one of our modules (s4l.training.config -> training/config.py), or None."""
    pkgs = [p for p in FOLDERS if name == p or name.startswith(p + ".")]
    if not pkgs:
        return None
    pkg = max(pkgs, key=len)
    rest = name[len(pkg) + 1:].split(".") if name != pkg else []
    base = FOLDERS[pkg].joinpath(*rest)
    for cand in ((base.with_suffix(".py"),) if rest else ()) + (base / "__init__.py",):
        if cand.exists():
            return cand
    return None


@functools.cache
def imports(path: Path) -> list[tuple[str, int]]:
    """Every module ``path`` imports, anywhere in the file, as absolute names with line numbers.

    ``from a import b`` yields ``a`` and ``a.b`` (b may be a submodule); relative imports are
    resolved; ``importlib.import_module("x")`` and ``__import__("x")`` with a literal count too.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    try:
        here = _module_name(path)
        package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    except ValueError:
        package = ""
    out: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            out.append((mod, node.lineno))
            out += [(f"{mod}.{a.name}", node.lineno) for a in node.names if a.name != "*"]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            if name in ("import_module", "__import__"):
                out.append((node.args[0].value, node.lineno))
    return out


def _is(name: str, top: str) -> bool:
    return name == top or name.startswith(top + ".")


def _py_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if ".venv" not in p.parts)


def _server_modules() -> list[Path]:
    return [p for p in _py_files(FOLDERS["s4l.service"]) if p.name not in SERVICE_BUILD_STEPS]


def _closure(start: Path) -> dict[str, tuple[Path, int]]:
    """Every module reachable from ``start`` through imports anywhere in our files: name ->
    (the file that imports it first, line)."""
    seen: dict[str, tuple[Path, int]] = {}
    todo = [start]
    done: set[Path] = set()
    while todo:
        f = todo.pop()
        if f in done:
            continue
        done.add(f)
        for name, line in imports(f):
            seen.setdefault(name, (f, line))
            target = _module_file(name)
            if target is not None and target not in done:
                todo.append(target)
    return seen


# -- the server never imports torch -----------------------------------------------------------

@pytest.mark.parametrize("module", _server_modules(), ids=lambda p: p.name)
def test_server_module_never_imports_torch(module):
    """Not directly, not inside a function, not through any of our modules it imports."""
    bad = {n: where for n, where in _closure(module).items() if _is(n, "torch")}
    assert not bad, "\n".join(f"{f.relative_to(ROOT)}:{line} imports {n}"
                              for n, (f, line) in sorted(bad.items()))


def test_server_module_list_is_not_empty():
    names = {p.name for p in _server_modules()}
    assert {"app.py", "backend.py", "cmd_serve.py"} <= names


def test_the_server_never_reaches_the_build_step():
    """What `s4l serve` can import never includes the export step (which imports torch)."""
    reached = _closure(FOLDERS["s4l.service"] / "cmd_serve.py")
    build = {f"s4l.service.{Path(n).stem}" for n in SERVICE_BUILD_STEPS}
    assert not build & set(reached), sorted(build & set(reached))


# -- the core imports none of the parts -----------------------------------------------------------

def _core_files() -> list[Path]:
    return [p for p in _py_files(FOLDERS["s4l"]) if p.parent == FOLDERS["s4l"]]


def _core_violations(path: Path) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line} imports {n}" for n, line in imports(path)
            if any(_is(n, f"s4l.{part}") or _is(n, part) for part in PARTS)]


@pytest.mark.parametrize("path", _core_files(), ids=lambda p: p.name)
def test_core_imports_none_of_the_parts(path):
    """s4l/ (version, dispatcher, image spec, io, datasets) imports nothing of training/,
    evaluation/, service/ or study/, not even inside a function."""
    found = _core_violations(path)
    if path.name in CORE_KNOWN_EXCEPTIONS:
        assert found, (f"s4l/{path.name} no longer imports a part: remove it from "
                       "CORE_KNOWN_EXCEPTIONS in tests/test_boundaries.py")
        pytest.xfail(f"known exception ({CORE_KNOWN_EXCEPTIONS[path.name]}): {len(found)} imports")
    assert not found, "\n".join(found)


def test_core_known_exceptions_exist():
    names = {p.name for p in _core_files()}
    assert set(CORE_KNOWN_EXCEPTIONS) <= names, "a listed exception no longer exists: drop it"


# -- no bare top-level folder imports ----------------------------------------------------------------

def test_nothing_imports_the_top_level_folders_by_bare_name():
    found = []
    for d in SOURCE_DIRS:
        for path in _py_files(ROOT / d):
            for name, line in imports(path):
                if any(_is(name, part) for part in PARTS):
                    found.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not found, "import s4l.<part>, never the bare folder:\n" + "\n".join(found)


# -- the serve extra ---------------------------------------------------------------------------

def test_serve_extra_is_torch_free():
    serve = PYPROJECT["project"]["optional-dependencies"]["serve"]
    assert not [d for d in serve if d.lower().startswith(("torch", "s4l["))], serve


# -- the checker itself ------------------------------------------------------------------------

def test_the_walk_sees_imports_inside_functions_and_relative_ones(tmp_path, monkeypatch):
    pkg = tmp_path / "service"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    f = pkg / "mod.py"
    f.write_text("import os\n\ndef later():\n    from torch import nn\n    from .backend import x\n"
                 "    import importlib\n    importlib.import_module('s4l.training.model')\n")
    monkeypatch.setitem(FOLDERS, "s4l.service", pkg)
    names = {n for n, _ in imports(f)}
    assert {"os", "torch", "torch.nn", "s4l.service.backend", "s4l.service.backend.x",
            "s4l.training.model"} <= names
    assert _module_file("s4l.training.config") == ROOT / "training" / "config.py"
    assert _module_file("s4l.io") == ROOT / "s4l" / "io.py"


# -- tests/support holds helpers, not tests ------------------------------------------------------

def test_tests_support_is_helpers_only_and_not_collected():
    import conftest

    assert "support" in conftest.collect_ignore
    support = ROOT / "tests" / "support"
    for path in _py_files(support):
        tests = [n.name for n in ast.walk(ast.parse(path.read_text()))
                 if isinstance(n, ast.FunctionDef | ast.ClassDef)
                 and n.name.startswith(("test_", "Test"))]
        assert not tests, f"{path.relative_to(ROOT)} defines tests {tests}: put them in tests/"
