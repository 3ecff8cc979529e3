"""onnxcomq: COMQ post-training quantization for ONNX models.

    import onnxcomq
    qmodel = onnxcomq.quantize("model.onnx", "calib.npz", onnxcomq.Recipe(weights=onnxcomq.Weights(bits=4)))
"""

__version__ = "0.1.0"

from .errors import UserError  # noqa: E402

# The public names are imported on first use (PEP 562), so that ``import onnxcomq.cli`` costs no numpy/onnx import
# before the command line's Ctrl-C handling is in place (an interrupt while importing is one line, not a traceback).
_LAZY = {"Recipe": "config", "Weights": "config", "Layers": "config", "Solver": "config", "Regularization": "config",
         "Data": "config", "Check": "config", "Sequential": "config", "MixedPrecision": "config",
         "Activations": "config", "Report": "report", "quantize": "pipeline", "run": "pipeline",
         "SolverConfig": "solve.comq",
         "comq_quantize": "solve.comq", "rtn_quantize": "solve.comq", "VerificationError": "verify"}


def __getattr__(name):
    import importlib

    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    try:  # onnxcomq.pipeline etc. without importing them first, as when this file imported them eagerly
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

__all__ = ["Recipe", "Weights", "Layers", "Solver", "Regularization", "Data", "Check", "Sequential",
           "MixedPrecision", "Activations", "Report", "quantize", "run", "UserError", "VerificationError", "SolverConfig", "comq_quantize",
           "rtn_quantize", "__version__"]
