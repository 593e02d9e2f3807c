"""Precision by capability: the recipe's top-level ``precision`` (``auto | 32 | bf16-mixed``) resolved
once at validation to what every stage's ``lightning.Trainer`` gets.

``auto`` is ``bf16-mixed`` where bf16 matmuls are native — a CUDA device that supports bf16, or a
CPU with ``avx512_bf16`` / ``amx_bf16`` (x86) or ``bf16`` (Arm) — and ``32`` elsewhere: on an AVX2-only
CPU bf16 is emulated and about 100× slower than fp32. Under ``bf16-mixed`` the matmuls run in bf16
(autocast) while the logprobs, KL, advantages and every loss reduction stay fp32 (``.float()`` in
``core.ops`` and the policy's ``forward``).
"""

from __future__ import annotations

import platform
import re
from pathlib import Path

import torch

from .errors import ConfigError, one_of

PRECISIONS = ("auto", "32", "bf16-mixed")
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
"""``/proc/cpuinfo`` flags of CPUs with bf16 arithmetic in hardware (x86 ``flags``, Arm ``Features``)."""


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags the kernel reports (empty where there is no ``/proc/cpuinfo``)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return frozenset(flags)


VECTOR_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "bf16")
"""The flags that decide the speed of fp32 and bf16 matmuls (recorded with every run)."""


def cpu_description(path: str = "/proc/cpuinfo") -> str:
    """``<model name>; flags <the VECTOR_FLAGS present>; torch <capability>`` for the run's record."""
    model = platform.processor() or "unknown"
    try:
        for line in Path(path).read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() == "model name" and value.strip():
                model = value.strip()
                break
    except OSError:
        pass
    flags = cpu_flags(path)
    present = [f for f in VECTOR_FLAGS if f in flags]
    return (
        f"{model}; flags {' '.join(present) or 'none of ' + ' '.join(VECTOR_FLAGS)}; torch {cpu_capability()}"
    )


def cpu_capability() -> str:
    """PyTorch's CPU kernel capability (``AVX512``, ``AVX2``, ``DEFAULT`` …)."""
    return str(torch.backends.cpu.get_cpu_capability())


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 in hardware (not emulated through fp32 AVX2)."""
    if cpu_capability() in ("AVX2", "NO AVX", "DEFAULT"):
        return False  # bf16 kernels would run through the emulation path
    return bool(NATIVE_BF16_FLAGS & cpu_flags())


def cuda_has_bf16() -> bool:
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def resolve_precision(value: str, accelerator: str = "cpu") -> str:
    """``"32"`` or ``"bf16-mixed"`` for a recipe's ``precision`` (``auto`` by capability of the
    ``trainer.accelerator``'s device); anything else is a one-line :class:`ConfigError`."""
    text = str(value).strip().lower()
    if text not in PRECISIONS:
        raise ConfigError(f"precision: must be one of {one_of(list(PRECISIONS))} (got {value!r})")
    if text != "auto":
        return text
    acc = re.sub(r"\W", "", str(accelerator).lower())
    if acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available()):
        return "bf16-mixed" if cuda_has_bf16() else "32"
    return "bf16-mixed" if cpu_has_native_bf16() else "32"
