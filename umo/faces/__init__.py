"""The face pipeline: detect (no grad) -> align (differentiable warp) -> embed (ArcFace)."""
