"""Array-module selection: the solver runs unchanged on NumPy (CPU) and CuPy (GPU).

Every solver function takes and returns arrays of one module ``xp``; this file is the only place that knows
whether CuPy exists. Device modules (CuPy, and in tests a strict CuPy double: ``register_device_module``) provide
``ndarray`` and ``asnumpy``.
"""

from __future__ import annotations

import numpy as np

try:  # CuPy is an optional extra (``pip install onnxcomq[gpu]``).
    import cupy as _cupy  # type: ignore
except Exception:  # pragma: no cover - depends on the machine
    _cupy = None

_DEVICE_MODULES = [] if _cupy is None else [_cupy]


def register_device_module(mod) -> None:
    """Make ``array_module`` and ``to_numpy`` recognize the arrays of ``mod``, a CuPy-like module (``mod.ndarray``,
    ``mod.asnumpy``); the tests register their strict CuPy double this way."""
    if mod not in _DEVICE_MODULES:
        _DEVICE_MODULES.append(mod)


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    if _cupy is None:
        return False
    try:
        return _cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # pragma: no cover - driver problems
        return False


def get_xp(device: str = "auto"):
    """Return the array module for ``device`` in {"auto", "cpu", "gpu"}.

    "auto" picks CuPy when a GPU is usable, NumPy otherwise; "gpu" without one is a clear error.
    """
    if device == "cpu":
        return np
    if device == "gpu":
        if not gpu_available():
            from ..errors import UserError

            raise UserError("--device gpu was asked for, but CuPy with a CUDA device is not available "
                               "(install onnxcomq[gpu] on a machine with an NVIDIA GPU, or use --device cpu)")
        return _cupy
    if device == "auto":
        return _cupy if gpu_available() else np
    raise ValueError(f"device must be one of auto, cpu, gpu; got {device!r}")


def array_module(a):
    """The module (numpy, or a device module such as cupy) that array ``a`` belongs to."""
    for mod in _DEVICE_MODULES:
        if isinstance(a, mod.ndarray):
            return mod
    return np


def to_numpy(a) -> np.ndarray:
    """Copy an array of any module to host memory (a numpy array is returned as it is)."""
    for mod in _DEVICE_MODULES:
        if isinstance(a, mod.ndarray):
            return mod.asnumpy(a)
    return np.asarray(a)
