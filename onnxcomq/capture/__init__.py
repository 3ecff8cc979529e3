"""Stage 2, capture: calibration data and its input layouts (calib), the one onnxruntime pass over it (passes,
session), each layer input turned into rows (rows) and folded into streaming statistics G = X^T X and the cross
statistics of sequential capture (gram), the batch size that fits memory (memory), activation ranges (observers)."""
