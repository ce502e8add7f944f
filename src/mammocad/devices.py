"""``--device`` resolution, shared by training, prediction and evaluation (one rule everywhere).

Accepted: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` (the process's GPU: the
``local_rank``-th under torchrun, else the first) and ``cuda:N`` (that GPU). Anything else, or CUDA
asked for where there is none or ``N`` beyond the GPUs present, is a one-line ConfigError here
rather than a torch traceback at the first ``.to(device)``.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch

from mammocad.errors import ConfigError

_CUDA = re.compile(r"cuda(?::(\d+))?")
CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(choice: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """The torch device for a ``--device`` value (see the module docstring)."""
    text = "auto" if choice is None else str(choice).strip().lower()
    if text == "cpu":
        return torch.device("cpu")
    match = _CUDA.fullmatch(text)
    if text != "auto" and match is None:
        raise ConfigError("--device", f"must be {CHOICES}, got {str(choice)!r}")
    available = torch.cuda.is_available()
    if text == "auto" and not available:
        return torch.device("cpu")
    if not available:
        raise ConfigError("--device", f"{text} requested but no CUDA device is available")
    count = torch.cuda.device_count()
    index = match.group(1) if match is not None else None
    if index is None:
        return torch.device("cuda", local_rank % max(1, count))
    if int(index) >= count:
        raise ConfigError("--device", f"{text} requested but this machine has {count} CUDA device(s) (cuda:0 to cuda:{count - 1})")
    return torch.device("cuda", int(index))


def cpu_supports_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX); emulated bf16 is slower than fp32."""
    if not torch.backends.mkldnn.is_available():
        return False
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, probe, None)  # private torch helpers (no public API for this yet)
        with contextlib.suppress(Exception):
            if fn is not None and fn():
                return True
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text(errors="ignore")
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return False
