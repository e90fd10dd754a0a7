"""The raw collection scan on a corpus of bad and awkward files: each is skipped and counted, or converted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from badfiles import rgb, write_bad_corpus

from umo.data.ingest import scan_collection
from umo.images import decode_rgb

SCAN = dict(extensions=[".jpg", ".jpeg", ".png", ".webp"], max_pixels=40_000_000, min_side=32)


@pytest.fixture()
def corpus(tmp_path):
    return write_bad_corpus(tmp_path)


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


def test_captions_are_decoded_never_garbled_and_bounded(tmp_path):
    """A UTF-16 sidecar became a prompt full of NULs, Latin-1 became U+FFFD, and a 100 MB caption went
    whole into train.json and through the tokenizer. Each is now read right, or dropped, or cut, and counted."""
    import json

    group = tmp_path / "raw" / "g"
    group.mkdir(parents=True)
    for k in range(7):
        rgb(k).save(group / f"p{k}.png")
    (group / "p0.txt").write_bytes("deux amis à Paris".encode("utf-16"))  # UTF-16 with its BOM: read right
    (group / "p1.txt").write_bytes("caf\xe9".encode("latin-1"))  # not UTF-8: no caption, counted
    (group / "p2.txt").write_bytes("two".encode("utf-16-le"))  # no BOM: NULs, counted
    (group / "p3.txt").write_bytes(b"x" * 10_000_000)  # 10 MB: cut to the limit, read no further
    (group / "p4.txt").write_bytes("\ufeffune amie".encode())  # UTF-8 with a BOM
    lines = [json.dumps({"image": "p5.png", "caption": "y" * 50}).encode(),
             b'{"image": "p6.png", "caption": "caf\xe9"}']
    (group / "captions.jsonl").write_bytes(b"\n".join(lines))
    result = scan_collection(tmp_path / "raw", **SCAN, max_caption_chars=20)
    by = {i.path.split("/")[1]: i.caption for i in result.images}
    assert by == {"p0.png": "deux amis à Paris", "p1.png": None, "p2.png": None, "p3.png": "x" * 20,
                  "p4.png": "une amie", "p5.png": "y" * 20, "p6.png": None}
    assert dict(result.skipped) == {"bad_caption_encoding": 2, "caption_truncated": 2, "bad_caption_line": 1}
    assert "p1.txt: not UTF-8 (byte 0xe9 at 3)" in result.examples["bad_caption_encoding"]
    assert "captions.jsonl:2: not UTF-8 (byte 0xe9" in result.examples["bad_caption_line"]


def test_unreadable_files_and_symlink_loops_are_skipped_and_counted_not_a_crash(tmp_path, monkeypatch):
    """A symlink loop in place of an image, or a file the process may not read, ended prepare with a
    traceback (hashing ran outside the skip logic); a group-level loop was not counted at all."""
    import os

    import umo.data.ingest as ingest

    group = tmp_path / "raw" / "g"
    group.mkdir(parents=True)
    rgb(1).save(group / "ok.png")
    rgb(2).save(group / "secret.png")
    os.symlink("loop.png", group / "loop.png")  # points at itself
    os.symlink(tmp_path / "raw" / "circle", tmp_path / "raw" / "circle")  # a group that is a loop
    real = ingest.sha256_file

    def no_permission(path):  # the tests run as root, where chmod 000 still reads: refuse the way the OS would
        if Path(path).name == "secret.png":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(ingest, "sha256_file", no_permission)
    result = scan_collection(tmp_path / "raw", **SCAN)
    assert [i.path for i in result.images] == ["g/ok.png"]
    assert dict(result.skipped) == {"unreadable": 3}
    assert sorted(result.skipped_files) == [
        ("unreadable", f"{tmp_path / 'raw' / 'circle'}: a symlink to no readable folder"),
        ("unreadable", f"{group / 'loop.png'}: a symlink loop"),
        ("unreadable", f"{group / 'secret.png'}: Permission denied")]


def test_unsupported_files_animations_and_no_op_orientations_are_counted_right(tmp_path):
    """Once, .gif and .avif files were not counted at all, animated images were used silently at their first
    frame, and exif_rotated was counted for orientation values (0, 9, 65535) where nothing is rotated."""
    from PIL import Image

    group = tmp_path / "raw" / "g"
    group.mkdir(parents=True)
    rgb(1).save(group / "still.png")
    (group / "still.txt").write_text("a caption")  # a sidecar: not a file to count
    rgb(2).save(group / "clip.gif")
    (group / "photo.avif").write_bytes(b"\x00\x00\x00\x1cftypavif")
    (group / "notes").write_text("x")
    frames = [rgb(3), rgb(4)]
    frames[0].save(group / "anim.webp", save_all=True, append_images=frames[1:], duration=100)
    for value in (0, 9, 65535, 6):
        exif = Image.Exif()
        exif[0x0112] = value
        rgb(5 + value % 7).save(group / f"orient{value}.jpg", exif=exif)
    result = scan_collection(tmp_path / "raw", **SCAN)
    assert dict(result.skipped) == {"unsupported_format": 3}
    assert sorted(w.split(": ")[0].rsplit("/", 1)[1] for r, w in result.skipped_files) == \
        ["clip.gif", "notes", "photo.avif"]
    assert dict(result.converted) == {"animated_first_frame": 1, "exif_rotated": 1}  # orientation 6 only
    assert len(result.images) == 6
