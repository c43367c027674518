"""Input/output: atomic writes of `.pt2`, ONNX and JSON results."""
