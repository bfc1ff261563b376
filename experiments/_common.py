"""Shared bits for experiment scripts: result folder, atomic JSON, a small table printer."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from symm.io import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"


def write_json(name: str, payload: dict) -> Path:
    path = atomic_write_text(RESULTS / f"{name}.json", json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    head = "  ".join(c.ljust(widths[c]) for c in columns)
    lines = [head, "-" * len(head)]
    lines += ["  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def quiet_logs() -> None:
    logging.basicConfig(level=logging.WARNING)
