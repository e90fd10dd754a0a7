"""The raw collection: find every image and caption, and keep only what decodes safely.

Layout (under `prepare.raw`, tracked by the top-level `data.dvc`):

    data/<group>/<image>.{jpg,jpeg,png,webp}     one folder per video / album / event
    data/<group>/captions.jsonl                   optional: {"image": "<file name>", "caption": "..."} per line
    data/<group>/<image>.txt                      optional sidecar caption (wins over captions.jsonl)

Every file is opened and fully decoded once here. A file that cannot be used is SKIPPED AND COUNTED by reason
(never an exception, never trained on); fixable ones are converted and counted:

- skipped: empty_file, not_an_image, truncated, unreadable, too_large (decompression bomb guard), too_small,
  outside_root (a symlink leaving the raw folder), duplicate (same bytes twice in a group);
- captions: bad_caption_path (a name with `..` or a folder), bad_caption_line (not JSON / wrong fields),
  caption_for_missing_image;
- converted: cmyk, high_bit_depth (16-bit), alpha (composited on white), grayscale, palette, exif_rotated.

Configuration mistakes (no raw folder, no group in it) raise `ValueError` naming the folder.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from umo.io import sha256_file

log = logging.getLogger(__name__)

CAPTIONS_FILE = "captions.jsonl"


@dataclass(frozen=True)
class RawImage:
    group: str
    path: str  # relative to the raw folder, POSIX
    sha256: str
    width: int
    height: int
    caption: str | None = None
    conversions: tuple[str, ...] = ()


@dataclass
class ScanResult:
    images: list[RawImage]
    skipped: Counter = field(default_factory=Counter)
    converted: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # reason -> first file it happened to

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, where)
        log.debug("skipped %s: %s", where, reason)


class BadImage(Exception):
    """An image that cannot be used; `reason` is a stats key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def decode_rgb(path: Path, *, max_pixels: int | None, min_side: int = 1) -> tuple[np.ndarray, list[str]]:
    """Decode an image file fully to (H, W, 3) uint8 RGB, upright (EXIF applied).

    max_pixels: None leaves only PIL's own decompression-bomb guard.

    Returns the array and the conversions applied (cmyk, high_bit_depth, alpha, grayscale, palette,
    exif_rotated). Raises BadImage with a stats reason otherwise.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if path.stat().st_size == 0:
        raise BadImage("empty_file", str(path))
    conversions: list[str] = []
    try:
        with Image.open(path) as im:
            w, h = im.size
            if max_pixels is not None and w * h > max_pixels:
                raise BadImage("too_large", f"{path}: {w}x{h} pixels > {max_pixels}")
            if min(w, h) < min_side:
                raise BadImage("too_small", f"{path}: {w}x{h}")
            im.load()
            if im.getexif().get(0x0112, 1) not in (1, None):  # EXIF orientation: turn it upright
                conversions.append("exif_rotated")
                im = ImageOps.exif_transpose(im)
            return _to_rgb(im, conversions), conversions
    except BadImage:
        raise
    except Image.DecompressionBombError as err:
        raise BadImage("too_large", f"{path}: {err}") from err
    except UnidentifiedImageError as err:
        raise BadImage("not_an_image", f"{path}: {err}") from err
    except (OSError, SyntaxError, ValueError) as err:
        reason = "truncated" if "truncated" in str(err).lower() else "unreadable"
        raise BadImage(reason, f"{path}: {err}") from err


def _to_rgb(im, conversions: list[str]) -> np.ndarray:
    from PIL import Image

    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: keep the top 8 bits, not PIL's clipping
        conversions += ["high_bit_depth", "grayscale"]
        arr = np.asarray(im, dtype=np.uint32)
        peak = 65535 if mode.startswith("I;16") or arr.max() > 255 else 255
        grey = (arr.astype(np.float64) * 255.0 / peak).round().clip(0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "CMYK":
        conversions.append("cmyk")
    elif mode in ("L", "1"):
        conversions.append("grayscale")
    elif mode == "P":
        conversions.append("palette")
        mode = "RGBA" if "transparency" in im.info else "RGB"
        im = im.convert(mode)
    if mode in ("RGBA", "LA", "PA"):
        conversions.append("alpha")
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(im.convert("RGB"))


def _safe_name(name: str) -> bool:
    p = PurePosixPath(name)
    return bool(name) and len(p.parts) == 1 and name not in (".", "..") and "\\" not in name


def _read_captions(group_dir: Path, result: ScanResult) -> dict[str, str]:
    captions: dict[str, str] = {}
    file = group_dir / CAPTIONS_FILE
    if not file.is_file():
        return captions
    for n, line in enumerate(file.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{file}:{n}"
        try:
            entry = json.loads(line)
            name, caption = entry["image"], entry["caption"]
            if not isinstance(name, str) or not isinstance(caption, str):
                raise TypeError("image and caption must be strings")
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            result.skip("bad_caption_line", f"{where}: {err}")
            continue
        if not _safe_name(name):
            result.skip("bad_caption_path", f"{where}: {name!r}")
            continue
        captions[name] = caption.strip()
    return captions


def scan_collection(raw: str | Path, *, extensions: list[str], max_pixels: int, min_side: int,
                    known: Callable[[str], tuple[int, int, list[str]] | None] | None = None,
                    on_decoded: Callable[[RawImage, np.ndarray], None] | None = None) -> ScanResult:
    """Every usable image of the raw collection, sorted by (group, file name); see the module docstring.

    known(sha256) -> (width, height, conversions) of an image validated before (a cache): it is not decoded
    again. on_decoded(image, rgb) receives every image that was decoded (to index it without a second decode).
    """
    raw = Path(raw)
    if not raw.is_dir():
        raise ValueError(f"raw collection {raw}: no such folder (put one folder per group of images there)")
    root = raw.resolve()
    groups = sorted(p for p in raw.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not groups:
        raise ValueError(f"raw collection {raw}: no group folders (expected {raw}/<group>/<images>)")
    result = ScanResult([])
    for group_dir in groups:
        if not group_dir.resolve().is_relative_to(root):
            result.skip("outside_root", str(group_dir))
            continue
        captions = _read_captions(group_dir, result)
        seen: dict[str, str] = {}
        names = set()
        for path in sorted(group_dir.iterdir()):
            if path.suffix.lower() not in extensions or path.name.startswith("."):
                continue
            names.add(path.name)
            where = str(path)
            if not path.resolve().is_relative_to(root):
                result.skip("outside_root", where)
                continue
            if not path.is_file():
                result.skip("unreadable", where)
                continue
            digest = sha256_file(path)
            if digest in seen:
                result.skip("duplicate", f"{where} (same bytes as {seen[digest]})")
                continue
            rgb = None
            cached = known(digest) if known else None
            if cached is not None:
                width, height, conversions = cached
            else:
                try:
                    rgb, conversions = decode_rgb(path, max_pixels=max_pixels, min_side=min_side)
                except BadImage as err:
                    result.skip(err.reason, where)
                    continue
                height, width = rgb.shape[:2]
            seen[digest] = path.name
            result.converted.update(conversions)
            sidecar = path.with_suffix(".txt")
            caption = sidecar.read_text(errors="replace").strip() if sidecar.is_file() else captions.get(path.name)
            image = RawImage(group_dir.name, path.relative_to(raw).as_posix(), digest, int(width), int(height),
                             caption or None, tuple(conversions))
            result.images.append(image)
            if rgb is not None and on_decoded is not None:
                on_decoded(image, rgb)
        for name in sorted(set(captions) - names):
            result.skip("caption_for_missing_image", f"{group_dir / CAPTIONS_FILE}: {name}")
    log.info("raw collection %s: %d images in %d groups; skipped %s; converted %s", raw, len(result.images),
             len({i.group for i in result.images}), dict(result.skipped) or "none", dict(result.converted) or "none")
    return result
