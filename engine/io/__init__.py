"""Input/output: the calibration/evaluation data loader (`data.py`), atomic writes of `.pt2`,
ONNX and JSON results."""
