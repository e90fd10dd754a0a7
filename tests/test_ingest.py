"""The raw collection scan on a corpus of bad and awkward files: each is skipped and counted, or converted."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from umo.data.ingest import decode_rgb, scan_collection

SCAN = dict(extensions=[".jpg", ".jpeg", ".png", ".webp"], max_pixels=40_000_000, min_side=32)


def rgb(seed: int, size=(48, 64)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8))


@pytest.fixture()
def corpus(tmp_path):
    raw = tmp_path / "data"
    g = raw / "event_a"
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


def test_every_bad_file_is_skipped_and_counted_and_the_rest_converted(corpus):
    result = scan_collection(corpus, **SCAN)
    names = sorted(i.path for i in result.images)
    assert names == sorted(f"event_a/{n}" for n in ["good.png", "photo.jpg", "cmyk.jpg", "deep16.png", "alpha.png",
                                                   "grey.png", "rotated.jpg"])
    assert dict(result.skipped) == {"empty_file": 1, "truncated": 1, "not_an_image": 1, "too_large": 1,
                                    "outside_root": 1, "duplicate": 1, "too_small": 1, "bad_caption_path": 2,
                                    "bad_caption_line": 1, "caption_for_missing_image": 1}
    assert dict(result.converted) == {"cmyk": 1, "high_bit_depth": 1, "grayscale": 2, "alpha": 1,
                                      "exif_rotated": 1}
    by = {i.path.split("/")[1]: i for i in result.images}
    assert by["good.png"].caption == "a sidecar caption" and by["photo.jpg"].caption == "two friends"
    assert by["cmyk.jpg"].caption is None
    assert (by["rotated.jpg"].width, by["rotated.jpg"].height) == (40, 60)  # EXIF orientation applied
    assert "link.png" in result.examples["outside_root"]


def test_conversions_give_sane_pixels(corpus):
    deep, conv = decode_rgb(corpus / "event_a" / "deep16.png", max_pixels=10**8)
    assert deep.dtype == np.uint8 and deep.shape == (48, 64, 3) and deep.max() > 200 and deep.min() == 0
    rgb(8).convert("P").save(corpus / "event_a" / "palette.png")
    palette, conv = decode_rgb(corpus / "event_a" / "palette.png", max_pixels=10**8)
    assert conv == ["palette"] and palette.shape == (48, 64, 3)  # no transparency: not counted as alpha
    alpha, _ = decode_rgb(corpus / "event_a" / "alpha.png", max_pixels=10**8)
    assert alpha.shape == (48, 64, 3) and alpha.mean() > np.asarray(rgb(3)).mean()  # half-transparent on white


def test_configuration_mistakes_are_errors(tmp_path):
    with pytest.raises(ValueError, match="no such folder"):
        scan_collection(tmp_path / "missing", **SCAN)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no group folders"):
        scan_collection(tmp_path / "empty", **SCAN)
