"""Files a run writes: atomic JSON, and which process writes them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch


def is_global_zero() -> bool:
    """True in the process that writes files (rank 0, or the only process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file in the same directory, then rename); rank 0 only."""
    if not is_global_zero():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=float))
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``."""
    return json.loads(Path(path).read_text())
