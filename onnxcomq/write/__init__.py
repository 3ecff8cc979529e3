"""Stage 4, write: the quantized weights as DequantizeLinear (qdq) or com.microsoft MatMulNBits (matmulnbits), the
re-fitted biases (bias), and activation Q/DQ placed per runtime target (activations)."""
