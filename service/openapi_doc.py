"""The committed OpenAPI document (service/openapi.json): build it, and rewrite it with `python -m`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

COMMITTED = Path(__file__).with_name("openapi.json")


def build_schema() -> dict:
    """The live app's schema; it depends on no model, so the dummy backend stands in."""
    from s4l.service.app import create_app
    from s4l.service.backend import DummyBackend
    from s4l.service.settings import Settings

    return create_app(Settings(), backend=DummyBackend()).openapi()


def dumps(schema: dict) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    out = Path((argv or sys.argv[1:] or [str(COMMITTED)])[0])
    from s4l.io import atomic_write_text

    atomic_write_text(out, dumps(build_schema()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
