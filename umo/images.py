"""Images in one place: decode a file (validated, upright, RGB), load it for a model, and convert pixels.

Two pixel forms meet in umo: uint8 RGB as files and face models hold them, and float in [-1, 1] as the VAE, the
reward's ArcFace and the trainer use them. `to_signed` and `to_uint8` are the only conversions between them
(p / 127.5 - 1 and round((x + 1) * 127.5), clamped), so every stage agrees to the bit. Evaluation saves an item's
images as one grid (`to_grid`, `from_grid`).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError


class BadImage(ValueError):
    """An image that cannot be used; `reason` is a stats key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def decode_rgb(path: str | Path, *, max_pixels: int | None, min_side: int = 1) -> tuple[np.ndarray, list[str]]:
    """Decode an image file fully to (H, W, 3) uint8 RGB, upright (EXIF applied).

    max_pixels: None leaves only PIL's own decompression-bomb guard.

    Returns the array and the conversions applied (cmyk, high_bit_depth, alpha, grayscale, palette,
    exif_rotated). Raises BadImage with a stats reason otherwise.
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise BadImage("empty_file", str(path))
    return _decode(path, str(path), max_pixels=max_pixels, min_side=min_side)


def decode_rgb_bytes(data: bytes, name: str, *, max_pixels: int | None,
                     min_side: int = 1) -> tuple[np.ndarray, list[str]]:
    """`decode_rgb` of an encoded image held in memory (a request's upload); `name` is what errors call it."""
    if not data:
        raise BadImage("empty_file", name)
    return _decode(io.BytesIO(data), name, max_pixels=max_pixels, min_side=min_side)


def _decode(source, name: str, *, max_pixels: int | None, min_side: int) -> tuple[np.ndarray, list[str]]:
    conversions: list[str] = []
    try:
        with Image.open(source) as im:
            w, h = im.size
            if max_pixels is not None and w * h > max_pixels:
                raise BadImage("too_large", f"{name}: {w}x{h} pixels > {max_pixels}")
            if min(w, h) < min_side:
                raise BadImage("too_small", f"{name}: {w}x{h}")
            if getattr(im, "is_animated", False):  # a GIF, APNG or animated WebP: its first frame, counted
                conversions.append("animated_first_frame")
                im.seek(0)
            im.load()
            if im.getexif().get(0x0112, 1) in range(2, 9):  # EXIF orientation 2-8 turns it; 0, 1, 9, 65535 do not
                conversions.append("exif_rotated")
                im = ImageOps.exif_transpose(im)
            return _to_rgb(im, conversions), conversions
    except BadImage:
        raise
    except Image.DecompressionBombError as err:
        raise BadImage("too_large", f"{name}: {err}") from err
    except UnidentifiedImageError as err:
        raise BadImage("not_an_image", f"{name}: {err}") from err
    except (OSError, SyntaxError, ValueError) as err:
        reason = "truncated" if "truncated" in str(err).lower() else "unreadable"
        raise BadImage(reason, f"{name}: {err}") from err


def _to_rgb(im: Image.Image, conversions: list[str]) -> np.ndarray:
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


def load_image(path: str | Path, size: Sequence[int]) -> torch.Tensor:
    """An image file -> (3, H, W) float in [-1, 1], center-cropped to the aspect of size = [H, W] and resized
    (bicubic). Decoded by `decode_rgb` (no pixel limit: the file was validated when it was collected); raises
    BadImage naming the file."""
    return fit_signed(decode_rgb(path, max_pixels=None)[0], size)


def fit_signed(rgb: np.ndarray, size: Sequence[int]) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, h, w) float in [-1, 1] for size = [h, w]: center-cropped to that aspect and
    resized (bicubic), as every reference is before it is encoded."""
    h, w = int(size[0]), int(size[1])
    return rgb_to_signed(np.asarray(ImageOps.fit(Image.fromarray(rgb), (w, h), method=Image.Resampling.BICUBIC)))


def to_signed(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels, any layout -> float32 in [-1, 1]."""
    return pixels.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float in [-1, 1], any layout -> uint8 pixels (clamped, rounded)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def rgb_to_signed(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) or (N, H, W, 3) uint8 RGB -> (3, H, W) or (N, 3, H, W) float32 in [-1, 1]."""
    floats = np.asarray(rgb, dtype=np.float32)  # a new, writable array (decoded images are often read-only)
    return torch.from_numpy(floats).movedim(-1, -3) / 127.5 - 1.0


def signed_to_rgb(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) or (N, 3, H, W) float in [-1, 1] -> (H, W, 3) or (N, H, W, 3) uint8 RGB (on the CPU)."""
    return np.ascontiguousarray(to_uint8(x.detach()).movedim(-3, -1).cpu().numpy())


def read_rgb(path: str | Path) -> np.ndarray:
    """A file this program wrote (a PNG) -> (H, W, 3) uint8 RGB, without the collection's checks."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols) of the grid an item's n images are saved in: 4 -> 2x2 (XVerseBench).

    >>> grid_shape(4), grid_shape(1), grid_shape(3)
    ((2, 2), (1, 1), (2, 2))
    """
    cols = int(np.ceil(np.sqrt(n)))
    return int(np.ceil(n / cols)), cols


def to_grid(images: list[np.ndarray]) -> np.ndarray:
    """n same-sized (H, W, 3) uint8 images -> one grid image, row by row (`grid_shape`)."""
    rows, cols = grid_shape(len(images))
    h, w = images[0].shape[:2]
    grid = np.zeros((rows * h, cols * w, 3), np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = img
    return grid


def from_grid(grid: np.ndarray, n: int) -> list[np.ndarray]:
    """The n images of a grid that `to_grid` made."""
    rows, cols = grid_shape(n)
    h, w = grid.shape[0] // rows, grid.shape[1] // cols
    return [grid[(k // cols) * h:(k // cols + 1) * h, (k % cols) * w:(k % cols + 1) * w] for k in range(n)]
