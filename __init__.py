"""instructrl: a plugin-based research framework for InstructGPT-style RLHF.

The repository root is this package: ``instructrl.core`` is ``core/``, ``instructrl.plugins`` is
``plugins/`` and the bundled recipes are ``instructrl.recipes``.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("instructrl")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"


def run(recipe: str, overrides: list[str] | None = None, **options: object) -> dict:
    """Run a recipe in this process and return its summary (see ``instructrl.core.api.run``)."""
    from instructrl.core.api import run as _run

    return _run(recipe, overrides or [], **options)  # type: ignore[arg-type]


__all__ = ["__version__", "run"]
