"""Pictures of the matching: what the judge (or the reward) saw in one generated image, and how the Hungarian
assignment paired its faces with the references.

    references | generated image, enlarged
    [ref 1] ───── 0.73 ────> [box of face 2]
    [ref 2] ───── 0.41 ────> [box of face 1]
    [ref 3]  ✗ no face                       [box of face 3: unmatched, dashed]

Each reference has its colour; its line ends on the box of the face it was assigned, labelled with their
similarity. A face no reference was assigned (more faces than people) keeps a grey dashed box and the word
"unmatched"; a reference that got no face (fewer faces than people) is crossed out. The assignment is the
reward's and the metrics' own (umo.reward.hungarian on the same similarity matrix), so the picture shows the
numbers in the report, not a redrawing of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from umo.reward import hungarian

# Distinct colours for up to 10 people (then they repeat): Tableau 10, readable on light and dark images.
COLOURS = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac"]
UNMATCHED = "#9e9e9e"


def matching_picture(image: np.ndarray, boxes: np.ndarray, sim: np.ndarray, references: Sequence[np.ndarray], *,
                     height: int = 256) -> np.ndarray:
    """One RGB uint8 picture: the reference thumbnails in a column on the left, the generated image enlarged
    to `height` on the right with every detected face boxed, and a line per assigned (reference, face) pair.

    image: (H, W, 3) uint8; boxes: (N, 4) x0, y0, x1, y1 in the image's pixels; sim: (M, N) similarities of
    the M references to the N faces; references: M RGB images (any size; shown as squares).
    """
    image = np.asarray(image)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    sim = np.asarray(sim, np.float64).reshape(len(references), len(boxes))
    m, n = sim.shape
    scale = height / image.shape[0]
    width = int(round(image.shape[1] * scale))
    thumb = max(16, min(96, height // max(m, 1) - 8))
    gutter = 72  # room for the lines and their labels between the thumbnails and the image
    left = 8 + thumb + gutter
    sheet = Image.new("RGB", (left + width + 8, max(height, m * (thumb + 8)) + 8 + 14), "white")
    sheet.paste(Image.fromarray(image).resize((width, height), Image.NEAREST), (left, 8))
    draw = ImageDraw.Draw(sheet)

    rows, cols = hungarian(sim) if m and n else (np.zeros(0, int), np.zeros(0, int))
    face_of = dict(zip(rows.tolist(), cols.tolist()))
    placed = boxes * scale + np.array([left, 8, left, 8])  # the boxes on the sheet
    for j in sorted(set(range(n)) - set(face_of.values())):
        x0, y0, x1, y1 = placed[j]
        _dashed_box(draw, (x0, y0, x1, y1), UNMATCHED)
        draw.text((x0 + 2, y1 + 2), "unmatched", fill=UNMATCHED)
    for i, ref in enumerate(references):
        colour = COLOURS[i % len(COLOURS)]
        top = 8 + i * (thumb + 8)
        sheet.paste(Image.fromarray(np.asarray(ref)).convert("RGB").resize((thumb, thumb)), (8, top))
        draw.rectangle((7, top - 1, 8 + thumb, top + thumb), outline=colour, width=2)
        draw.text((10, top + 1), str(i + 1), fill=colour)
        if i not in face_of:
            draw.line((8, top, 8 + thumb, top + thumb), fill="#d32f2f", width=3)
            draw.line((8, top + thumb, 8 + thumb, top), fill="#d32f2f", width=3)
            draw.text((12 + thumb, top + thumb // 2 - 6), "no face", fill="#d32f2f")
            continue
        x0, y0, x1, y1 = placed[face_of[i]]
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=3)
        start, end = (8 + thumb, top + thumb / 2), (x0, (y0 + y1) / 2)
        draw.line((*start, *end), fill=colour, width=3)
        label = (start[0] + 6, start[1] - 14 if start[1] <= end[1] else start[1] + 2)
        draw.text(label, f"{sim[i, face_of[i]]:.2f}", fill=colour)
    draw.text((left, sheet.height - 14), f"{n} faces, {m} people, {len(face_of)} pairs", fill="black")
    return np.asarray(sheet)


def _dashed_box(draw: ImageDraw.ImageDraw, box: tuple[float, float, float, float], colour: str, dash: int = 6):
    x0, y0, x1, y1 = box
    for a, b, horizontal, at in ((x0, x1, True, y0), (x0, x1, True, y1), (y0, y1, False, x0), (y0, y1, False, x1)):
        for s in np.arange(a, b, 2 * dash):
            e = min(s + dash, b)
            draw.line((s, at, e, at) if horizontal else (at, s, at, e), fill=colour, width=2)
