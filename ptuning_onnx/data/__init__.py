"""Small datasets shipped with ptuning_onnx (see README.md)."""
