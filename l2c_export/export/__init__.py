"""From a PyTorch model to ONNX graphs: one universal graph, cut per subset of computed sub-layers, weights stored
once, quantized where asked; and the check against TensorRT's ONNX operator matrix."""
