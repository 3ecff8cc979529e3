"""Stage 3, solve: COMQ on NumPy or CuPy (backend) over grids (grid, blockwise), and one layer's solve from its
statistics with damping, free bias and the round-to-nearest fallback (layer.quantize_layer). Never imports onnx."""
