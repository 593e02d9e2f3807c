"""Stable hashes of resolved config trees (stage-cache keys)."""

from __future__ import annotations

import hashlib
import json

from ..fields import to_plain


def stable_hash(obj: object) -> str:
    """A short sha256 of a JSON-serialisable object (keys sorted)."""
    text = json.dumps(to_plain(obj), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
