"""A corpus of bad and awkward raw files (tests of the scan and of the whole prepare stage)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image


def rgb(seed: int, size=(48, 64)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8))


def write_bad_corpus(tmp_path: Path, group: str = "event_a") -> Path:
    """tmp_path/data/<group>/ with one file of each kind the scan must skip or convert (and the caption
    mistakes); a file outside the raw folder for the symlink to point at. Returns the raw folder."""
    raw = tmp_path / "data"
    g = raw / group
    g.mkdir(parents=True)
    rgb(0).save(g / "good.png")
    rgb(1).save(g / "photo.jpg", quality=95)
    (g / "empty.jpg").write_bytes(b"")
    full = (g / "photo.jpg").read_bytes()
    (g / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (g / "text.jpg").write_text("this is not an image\n")
    rgb(2).convert("CMYK").save(g / "cmyk.jpg")
    Image.fromarray((np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 20)).save(g / "deep16.png")
    rgba = rgb(3).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(g / "alpha.png")
    rgb(4).convert("L").save(g / "grey.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    rgb(5, size=(40, 60)).save(g / "rotated.jpg", exif=exif)
    Image.new("L", (20000, 20000)).save(g / "bomb.png", optimize=False)  # 400 M pixels, tiny file
    outside = tmp_path / "secret.png"
    rgb(6).save(outside)
    os.symlink(outside, g / "link.png")
    (g / "zcopy.png").write_bytes((g / "good.png").read_bytes())
    rgb(7, size=(16, 16)).save(g / "tiny.png")
    (g / "good.txt").write_text("a sidecar caption\n")
    lines = [{"image": "photo.jpg", "caption": "two friends"}, {"image": "../../secret.png", "caption": "x"},
             {"image": "sub/good.png", "caption": "x"}, {"image": "gone.png", "caption": "x"}]
    (g / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    return raw
