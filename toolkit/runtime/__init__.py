"""Running an export: the onnxruntime predictor, the one backend factory and its runners, classify."""
