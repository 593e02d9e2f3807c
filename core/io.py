"""Files a run writes: every file is written atomically (temp file, fsync, rename), and which
process writes them; the check that a path is an HF model dir."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

import torch

from . import faults
from .errors import ConfigError


def is_global_zero() -> bool:
    """True in the process that writes files (rank 0, or the only process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0


TMP_MARK = ".tmp-"
_STALE_TMP = re.compile(r".+\.tmp-\d+$")


def temp_path(path: str | os.PathLike[str]) -> Path:
    """``<path>.tmp-<pid>``: where :func:`atomic_write` (and the checkpoint writer) build ``path``."""
    return Path(f"{os.fspath(path)}{TMP_MARK}{os.getpid()}")


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory, so a rename inside it survives a power cut (best effort)."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """An open binary file that becomes ``path`` only when the block ends without an exception:
    written to ``<path>.tmp-<pid>`` in the same directory, flushed, fsync'ed, renamed, the
    directory fsync'ed. On any exception (a full disk, a second Ctrl-C) the temporary file is
    removed and ``path`` is untouched. Counts as one durable write for ``$INSTRUCTRL_FAULT_ENOSPC``."""
    path = Path(path)
    faults.before_write(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike[str], data: str | bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def clean_stale_temps(root: str | os.PathLike[str]) -> list[Path]:
    """Remove the ``*.tmp-<pid>`` files a killed writer left under ``root`` (not following
    symlinks); returns them."""
    removed = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            if _STALE_TMP.match(name):
                p = Path(dirpath) / name
                with suppress(OSError):
                    p.unlink()
                    removed.append(p)
    return removed


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (:func:`atomic_write`); rank 0 only."""
    if not is_global_zero():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(data, indent=2, sort_keys=True, default=float))


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``."""
    return json.loads(Path(path).read_text())


TOKENIZER_FILES = ("tokenizer.json",)
"""A fast tokenizer in one file; or ``tokenizer_config.json`` with one of :data:`VOCAB_FILES`."""
VOCAB_FILES = ("vocab.json", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


def require_model_dir(path: str | os.PathLike[str], key: str) -> Path:
    """Check that ``path`` is an HF model dir: a readable ``config.json`` and tokenizer files
    (``tokenizer.json``, or ``tokenizer_config.json`` with a vocabulary file); a one-line
    ConfigError naming ``key`` otherwise. Nothing is loaded."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{key}: model dir not found: {p}")
    if not p.is_dir():
        raise ConfigError(f"{key}: not a model dir (a file): {p}")
    config = p / "config.json"
    if not config.is_file():
        raise ConfigError(f"{key}: not an HF model dir (no config.json): {p}")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        where = f":{exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise ConfigError(f"{key}: {config}{where}: unreadable config.json ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: {config}: config.json must be a JSON object")
    has_tokenizer = any((p / f).is_file() for f in TOKENIZER_FILES) or (
        (p / "tokenizer_config.json").is_file() and any((p / f).is_file() for f in VOCAB_FILES)
    )
    if not has_tokenizer:
        raise ConfigError(
            f"{key}: no tokenizer in {p} (expected tokenizer.json, or tokenizer_config.json with "
            f"{' / '.join(VOCAB_FILES)}); save it with tokenizer.save_pretrained(dir)"
        )
    return p
