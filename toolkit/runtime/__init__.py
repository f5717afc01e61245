"""Running an export: the onnxruntime predictor, runners for every backend, classify."""
