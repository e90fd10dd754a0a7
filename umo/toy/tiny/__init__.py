"""Tiny test models in the real formats: marker faces and ONNX face models, a FLUX.2 [klein] folder."""
