"""Plain containers shared by the face pipeline's stages."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Detections:
    """Faces found in ONE image, in that image's pixel coordinates (x right, y down), best score first.

    boxes:     (K, 4) float32, x1, y1, x2, y2
    landmarks: (K, 5, 2) float32, left eye, right eye, nose, left mouth corner, right mouth corner
               (the subject's left/right as insightface orders them: image-left eye first)
    scores:    (K,) float32 in [0, 1]
    """

    boxes: np.ndarray
    landmarks: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @staticmethod
    def empty() -> "Detections":
        return Detections(
            np.zeros((0, 4), np.float32), np.zeros((0, 5, 2), np.float32), np.zeros((0,), np.float32)
        )

    def largest(self) -> "Detections":
        """The single face with the largest box area (the paper's reference-face rule); empty stays empty."""
        if len(self) == 0:
            return self
        area = (self.boxes[:, 2] - self.boxes[:, 0]) * (self.boxes[:, 3] - self.boxes[:, 1])
        i = int(np.argmax(area))
        return Detections(self.boxes[i : i + 1], self.landmarks[i : i + 1], self.scores[i : i + 1])
