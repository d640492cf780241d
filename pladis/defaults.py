"""Defaults and ranges that command settings show in ``--help``, for the rooms that own their meaning
(``pladis.numerics``: lam and alpha; ``pladis.export.onnx_op``: the opsets). Imports nothing, so the CLI can
describe every command without loading torch or onnx."""

DEFAULT_LAM = 2.0  # the paper's and the official code's `pladis_scale`
DEFAULT_ALPHA = 1.5  # entmax15
LAM_RANGE = (0.0, 10.0)
DEFAULT_OPSET = 17  # TensorRT 10's ONNX parser reads opsets 9-20; 17 is what NVIDIA's diffusion demo uses
MIN_OPSET, MAX_OPSET = 17, 20
