"""Writing a workload JSONL for the load tests' tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_workload(path: Path, items: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    return path
