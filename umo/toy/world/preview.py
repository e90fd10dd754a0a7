"""Contact sheets of toy-world images, for looking at what the renderer makes.

    python -m umo.toy.world.preview /tmp/toyworld_sheet.png [--seed 0] [--boxes]
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from umo.toy.world.identity import make_identity
from umo.toy.world.render import Scene, render_portrait, render_scene

log = logging.getLogger(__name__)


def contact_sheet(images: Sequence[np.ndarray], columns: int, gap: int = 4) -> np.ndarray:
    """Tile equally sized (H, W, 3) uint8 images into one (rows * (H + gap), columns * (W + gap), 3) sheet."""
    if not images:
        raise ValueError("contact_sheet needs at least one image")
    h, w = images[0].shape[:2]
    rows = -(-len(images) // columns)
    sheet = np.full((rows * (h + gap), columns * (w + gap), 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        sheet[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = img
    return sheet


def annotate(scene: Scene) -> np.ndarray:
    """A copy of the scene image with its boxes (green) and landmarks (red) drawn on."""
    img = scene.image.copy()
    for box, lmk in zip(scene.boxes, scene.landmarks):
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        cv2.rectangle(img, (x1, y1), (x2, y2), (0, 255, 0), 1)
        for x, y in lmk:
            cv2.circle(img, (int(round(float(x))), int(round(float(y)))), 1, (255, 0, 0), -1)
    return img


def sample_scenes(world_seed: int, n: int) -> list[Scene]:
    """n scenes (1..4 people, cycling) plus, every fifth, a portrait; identities 0..499."""
    rng = np.random.default_rng((world_seed, 99))
    scenes = []
    for i in range(n):
        ids = [int(v) for v in rng.choice(500, size=1 + i % 4, replace=False)]
        people = [make_identity(world_seed, j) for j in ids]
        if i % 5 == 4:
            scenes.append(render_portrait(people[0], rng))
        else:
            scenes.append(render_scene(world_seed, people, rng))
    return scenes


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-n", type=int, default=20)
    parser.add_argument("--columns", type=int, default=5)
    parser.add_argument("--boxes", action="store_true", help="draw the ground-truth boxes and landmarks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    scenes = sample_scenes(args.seed, args.n)
    images = [annotate(s) if args.boxes else s.image for s in scenes]
    sheet = contact_sheet(images, args.columns)
    cv2.imwrite(str(args.out), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    for i, s in enumerate(scenes):
        log.info("%2d: %s", i, s.caption)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
