"""Stage 1, the graph: read and prepare the model (modelio), find the layers COMQ can quantize and what each reads
(layers: Layer, XSpec), and rewrite constant weights that cannot be quantized where they stand (rewrite)."""
