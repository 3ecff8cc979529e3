"""onnxcomq: COMQ post-training quantization for ONNX models.

    import onnxcomq
    qmodel = onnxcomq.quantize("model.onnx", "calib.npz", onnxcomq.QuantizeConfig(bits=4))
"""

__version__ = "0.1.0"

from .api import QuantizeConfig, Report, quantize, run  # noqa: E402
from .errors import UserError  # noqa: E402
from .solver import SolverConfig, comq_quantize, rtn_quantize  # noqa: E402

__all__ = ["QuantizeConfig", "Report", "quantize", "run", "UserError", "SolverConfig", "comq_quantize",
           "rtn_quantize", "__version__"]
