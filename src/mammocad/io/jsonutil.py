"""Strict-JSON values: JSON has no NaN/inf, so every writer maps them to null the same way.

Hand-written because ``json`` only offers ``allow_nan`` (fail or write invalid JSON) and no
library converts numpy/torch scalars, arrays and paths in one pass.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np


def finite_or_none(x: Any) -> float | None:
    """``x`` as a Python float, or None when it is NaN/inf (strict JSON has neither)."""
    return float(x) if np.isfinite(x) else None


def json_clean(obj: Any) -> Any:
    """``obj`` as strict JSON values: NaN/inf -> None, tuples/arrays -> lists, paths -> strings,
    numpy/torch scalars -> Python numbers; anything else raises TypeError."""
    if isinstance(obj, dict):
        return {str(k): json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_clean(v) for v in obj]
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.ndarray):
        return json_clean(obj.tolist())
    if hasattr(obj, "item"):  # numpy / torch scalars
        return json_clean(obj.item())
    raise TypeError(f"not a JSON value: {type(obj).__name__}")
