"""Export and engine-build steps (ONNX, TensorRT, MLLM)."""
