"""Test-only fault switches, all in one place (documented in ``docs/reliability.md``).

Both are read from the environment at the moment they are checked, so a test sets them for one
subprocess (or with ``monkeypatch.setenv`` in-process); unset, they cost one dict lookup.

``INSTRUCTRL_FAULT_KILL_AT=<point>[@<SIGNAL>]``
    At the named point the process sends itself ``SIGNAL`` (default ``SIGKILL``: no handler, no
    cleanup — a power cut). Points:

    * ``<stage>:batch:<k>`` — after the optimiser step of the stage's ``k``-th training batch
      (counted from 1 over the whole stage, also across a resume);
    * ``<stage>:epoch:<e>`` — at the end of epoch ``e`` (0-based; an RL iteration), before its
      checkpoint is written;
    * ``checkpoint:write:<n>`` — inside the ``n``-th checkpoint write of this process, with the
      temporary file half written;
    * ``stage:<name>:done`` — after stage ``name`` returned, before the run records it complete.

``INSTRUCTRL_FAULT_ENOSPC=<n>[@<text>]``
    The ``n``-th durable write of this process (:func:`instructrl.core.io.atomic_write` — JSON,
    YAML, ``metrics.csv`` — and every checkpoint), or with ``@text`` the ``n``-th write to a path
    containing ``text`` (``1@last.ckpt``: the first checkpoint), raises ``OSError(ENOSPC)``: a
    full disk.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from typing import IO

KILL_AT_ENV = "INSTRUCTRL_FAULT_KILL_AT"
ENOSPC_ENV = "INSTRUCTRL_FAULT_ENOSPC"

_writes = 0
_checkpoint_writes = 0


def reset() -> None:
    """Forget the write counters (tests that run several in-process runs)."""
    global _writes, _checkpoint_writes
    _writes = _checkpoint_writes = 0


def kill_point(name: str, partial: IO[bytes] | None = None) -> None:
    """Fire ``$INSTRUCTRL_FAULT_KILL_AT`` if it names ``name``; ``partial``, an open file being
    written, is cut to half its length first (a write killed half way)."""
    spec = os.environ.get(KILL_AT_ENV)
    if not spec:
        return
    point, _, sig = spec.partition("@")
    if point != name:
        return
    if partial is not None:
        partial.flush()
        partial.truncate(max(0, partial.tell() // 2))
        partial.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), getattr(signal, sig or "SIGKILL"))


def before_write(path: str | os.PathLike[str]) -> None:
    """Count one durable write; raise ``OSError(ENOSPC)`` on the ``$INSTRUCTRL_FAULT_ENOSPC``-th
    (``<n>@<text>``: the ``n``-th write to a path containing ``text``, e.g. ``1@last.ckpt``)."""
    global _writes
    spec = os.environ.get(ENOSPC_ENV)
    if not spec:
        return
    n, _, within = spec.partition("@")
    if within and within not in os.fspath(path):
        return
    _writes += 1
    if _writes == int(n):
        raise OSError(errno.ENOSPC, f"No space left on device ({ENOSPC_ENV}={spec})", os.fspath(path))


def checkpoint_write(path: str | os.PathLike[str], partial: IO[bytes]) -> None:
    """Called inside every checkpoint write, after the bytes went to the temporary file."""
    global _checkpoint_writes
    _checkpoint_writes += 1
    kill_point(f"checkpoint:write:{_checkpoint_writes}", partial)
