"""The raw collection: find every image and caption, and keep only what decodes safely.

Layout (under `prepare.raw`, tracked by the top-level `data.dvc`):

    data/<group>/<image>.{jpg,jpeg,png,webp}     one folder per video / album / event
    data/<group>/captions.jsonl                   optional: {"image": "<file name>", "caption": "..."} per line
    data/<group>/<image>.txt                      optional sidecar caption (wins over captions.jsonl)

Every file is opened and fully decoded once here. A file that cannot be used is SKIPPED AND COUNTED by reason
(never an exception, never trained on); fixable ones are converted and counted:

- skipped: empty_file, not_an_image, truncated, unreadable, too_large (decompression bomb guard), too_small,
  outside_root (a symlink leaving the raw folder), duplicate (same bytes twice in a group);
- captions: bad_caption_path (a name with `..` or a folder), bad_caption_line (not JSON / wrong fields / not
  UTF-8), caption_for_missing_image, bad_caption_encoding (a sidecar that is neither UTF-8 nor UTF-16 with a BOM,
  or holds control characters: its image is kept, with no caption), caption_truncated (longer than
  `prepare.max_caption_chars`: cut there, the image kept);
- unsupported_format: a file of the group that is none of `prepare.extensions`, a caption sidecar or
  captions.jsonl (a .gif, .avif, .heic ...: add its extension to use it);
- converted: cmyk, high_bit_depth (16-bit), alpha (composited on white), grayscale, palette, exif_rotated (EXIF
  orientations 2-8 only), animated_first_frame (an animated image: its first frame).

Configuration mistakes (no raw folder, no group in it) raise `ValueError` naming the folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from umo.config import VideoConfig
from umo.data.video import BadVideo, read_video, sampling_key
from umo.images import BadImage, decode_rgb
from umo.io import atomic_dir, atomic_write_json, sha256_file

log = logging.getLogger(__name__)

CAPTIONS_FILE = "captions.jsonl"
SKIP_LIST_LIMIT = 10_000  # skipped files listed by name (all are counted): a bounded list for millions of files


@dataclass(frozen=True)
class RawImage:
    group: str
    path: str  # relative to the raw folder, POSIX; a video's frame: "<video path>#<frame index>"
    sha256: str  # the file's; a video frame's: of (the video's sha256, its index, the sampling settings)
    width: int
    height: int
    caption: str | None = None
    conversions: tuple[str, ...] = ()
    clip: str | None = None  # a video frame's shot ("shot3"); references never come from the target's clip
    frame_file: str | None = None  # a video frame's pixels: its PNG in the frame cache


@dataclass
class ScanResult:
    images: list[RawImage]
    skipped: Counter = field(default_factory=Counter)
    converted: Counter = field(default_factory=Counter)
    video: Counter = field(default_factory=Counter)  # videos, shots, candidates, frames, blurry_frame, ...
    examples: dict[str, str] = field(default_factory=dict)  # reason -> first file it happened to
    skipped_files: list[tuple[str, str]] = field(default_factory=list)  # (reason, where), the first SKIP_LIST_LIMIT

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, where)
        if len(self.skipped_files) < SKIP_LIST_LIMIT:
            self.skipped_files.append((reason, where))
        log.debug("skipped %s: %s", where, reason)


def _safe_name(name: str) -> bool:
    p = PurePosixPath(name)
    return bool(name) and len(p.parts) == 1 and name not in (".", "..") and "\\" not in name


DEFAULT_MAX_CAPTION_CHARS = 2000
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # C0/C1 controls; tab and newlines are text


def decode_caption(data: bytes) -> str:
    """Caption bytes as text: UTF-8 (a BOM dropped) or UTF-16 with its BOM; never a guess that garbles.

    Raises UnicodeError naming what is wrong: bytes that are not UTF-8, or control characters (a UTF-16 file
    without its BOM reads as text full of NULs).

    >>> decode_caption("é".encode("utf-16"))
    'é'
    >>> decode_caption(b"caf\\xe9")
    Traceback (most recent call last):
    ...
    UnicodeError: not UTF-8 (byte 0xe9 at 3), nor UTF-16 with a BOM
    """
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        text = data.decode("utf-16")
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise UnicodeError(f"not UTF-8 (byte 0x{data[err.start]:02x} at {err.start}), nor UTF-16 with a BOM") \
                from None
    bad = _CONTROL.search(text)
    if bad:
        raise UnicodeError(f"control character U+{ord(bad.group()):04X} at {bad.start()}")
    return text


def _bounded(caption: str, where: str, limit: int, result: ScanResult) -> str:
    caption = caption.strip()
    if len(caption) > limit:
        result.skip("caption_truncated", f"{where}: {len(caption)} characters, cut to {limit}")
        caption = caption[:limit].rstrip()
    return caption


def _read_captions(group_dir: Path, result: ScanResult, limit: int) -> dict[str, str]:
    captions: dict[str, str] = {}
    file = group_dir / CAPTIONS_FILE
    if not file.is_file():
        return captions
    for n, raw_line in enumerate(file.read_bytes().splitlines(), start=1):
        if not raw_line.strip():
            continue
        where = f"{file}:{n}"
        try:
            entry = json.loads(raw_line.decode("utf-8-sig" if n == 1 else "utf-8"))
            name, caption = entry["image"], entry["caption"]
            if not isinstance(name, str) or not isinstance(caption, str):
                raise TypeError("image and caption must be strings")
            if _CONTROL.search(caption):
                raise ValueError("control characters in the caption")
        except UnicodeDecodeError as err:
            result.skip("bad_caption_line", f"{where}: not UTF-8 (byte 0x{raw_line[err.start]:02x} at {err.start})")
            continue
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            result.skip("bad_caption_line", f"{where}: {err}")
            continue
        if not _safe_name(name):
            result.skip("bad_caption_path", f"{where}: {name!r}")
            continue
        captions[name] = _bounded(caption, where, limit, result)
    return captions


def _read_sidecar(sidecar: Path, result: ScanResult, limit: int) -> str | None:
    """A `.txt` caption, at most `limit` characters; the file is read no further than 4 bytes a character."""
    with open(sidecar, "rb") as f:
        data = f.read(4 * limit + 4)
        longer = bool(f.read(1))
    text, error = None, None
    for cut in range(4 if longer else 1):  # a read that stops inside a character drops its first bytes
        try:
            text = decode_caption(data[:len(data) - cut])
            break
        except UnicodeError as err:
            error = error or err
    if text is None:
        result.skip("bad_caption_encoding", f"{sidecar}: {error}")
        return None
    if longer:
        result.skip("caption_truncated", f"{sidecar}: over {limit} characters, cut to {limit}")
        return text.strip()[:limit].rstrip() or None
    return _bounded(text, str(sidecar), limit, result) or None


def _resolved(path: Path) -> Path | None:
    """The path with its symlinks resolved; None for a symlink loop."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # Python 3.11 raises RuntimeError for a loop
        return None


def scan_collection(raw: str | Path, *, extensions: list[str], max_pixels: int, min_side: int,
                    known: Callable[[str], tuple[int, int, list[str]] | None] | None = None,
                    on_decoded: Callable[[RawImage, np.ndarray], None] | None = None,
                    max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS, video: VideoConfig | None = None,
                    shard: tuple[int, int] | None = None) -> ScanResult:
    """Every usable image of the raw collection, sorted by (group, file name); see the module docstring.

    known(sha256) -> (width, height, conversions) of an image validated before (a cache): it is not decoded
    again. on_decoded(image, rgb) receives every image that was decoded (to index it without a second decode).
    video: how videos are read (umo.data.video); None = videos are unsupported files.
    shard: (rank, world): only every world-th image or video file of the collection (sorted by group and name),
    starting at the rank-th, is read; the others are passed over uncounted (another process reads them).
    """
    video_ext = [e.lower() for e in video.extensions] if video is not None else []
    raw = Path(raw)
    if not raw.is_dir():
        raise ValueError(f"raw collection {raw}: no such folder (put one folder per group of images there)")
    root = raw.resolve()
    entries = sorted(p for p in raw.iterdir() if not p.name.startswith("."))
    groups = [p for p in entries if p.is_dir()]
    # a symlink that leads nowhere (a loop, a dangling or unreadable target) where a group folder would be
    broken = [p for p in entries if p.is_symlink() and not p.is_dir()]
    if not groups:
        raise ValueError(f"raw collection {raw}: no group folders (expected {raw}/<group>/<images>)")
    result = ScanResult([])
    position = -1  # of the image or video file in the whole collection's order (sharding)
    for link in broken:
        result.skip("unreadable", f"{link}: a symlink to no readable folder")
    for group_dir in groups:
        resolved = _resolved(group_dir)
        if resolved is None or not resolved.is_relative_to(root):
            result.skip("outside_root" if resolved else "unreadable", str(group_dir))
            continue
        captions = _read_captions(group_dir, result, max_caption_chars)
        seen: dict[str, str] = {}
        names = set()
        files = sorted(group_dir.iterdir())
        sidecars = {p.with_suffix(".txt").name for p in files if p.suffix.lower() in extensions}
        for path in files:
            if path.name.startswith("."):
                continue
            if shard is not None and path.suffix.lower() in (*extensions, *video_ext):
                position += 1
                if position % shard[1] != shard[0]:
                    continue
            if path.suffix.lower() in video_ext:
                _add_video(path, raw, root, video, max_pixels, result, seen, known, on_decoded, max_caption_chars)
                continue
            if path.suffix.lower() not in extensions:
                if path.name != CAPTIONS_FILE and path.name not in sidecars:  # .gif, .avif, .heic, notes ...
                    result.skip("unsupported_format", f"{path}: {path.suffix or 'no extension'} is not in "
                                                      f"prepare.extensions {list(extensions)} nor "
                                                      f"prepare.video.extensions {video_ext}")
                continue
            names.add(path.name)
            where = str(path)
            resolved = _resolved(path)
            if resolved is None:
                result.skip("unreadable", f"{where}: a symlink loop")
                continue
            if not resolved.is_relative_to(root):
                result.skip("outside_root", where)
                continue
            if not path.is_file():
                result.skip("unreadable", where)
                continue
            try:
                digest = sha256_file(path)
            except OSError as err:  # no permission, an I/O error: the file is skipped, never the whole scan
                result.skip("unreadable", f"{where}: {err.strerror or err}")
                continue
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
            caption = _read_sidecar(sidecar, result, max_caption_chars) if sidecar.is_file() \
                else captions.get(path.name)
            image = RawImage(group_dir.name, path.relative_to(raw).as_posix(), digest, int(width), int(height),
                             caption or None, tuple(conversions))
            result.images.append(image)
            if rgb is not None and on_decoded is not None:
                on_decoded(image, rgb)
        for name in sorted(set(captions) - names) if shard is None else ():
            result.skip("caption_for_missing_image", f"{group_dir / CAPTIONS_FILE}: {name}")
    log.info("raw collection %s: %d images in %d groups; skipped %s; converted %s; videos %s", raw,
             len(result.images), len({i.group for i in result.images}), dict(result.skipped) or "none",
             dict(result.converted) or "none", dict(result.video) or "none")
    return result


FRAMES_FILE = "frames.json"


def _add_video(path: Path, raw: Path, root: Path, video: VideoConfig, max_pixels: int, result: ScanResult,
               seen: dict[str, str], known, on_decoded, max_caption_chars: int) -> None:
    """A video's kept frames as images of its own group, `<folder>/<video stem>`, each frame's shot its clip.

    The frames are read once (umo.data.video) into the frame cache, by the video's content hash and the sampling
    settings; a later scan reads that cache and never opens the video again. A video that cannot be used is
    skipped and counted by its reason (umo.data.video.BadVideo)."""
    where = str(path)
    resolved = _resolved(path)
    if resolved is None or not resolved.is_relative_to(root) or not path.is_file():
        result.skip("outside_root" if resolved is not None and not resolved.is_relative_to(root) else "unreadable",
                    where)
        return
    try:
        digest = sha256_file(path)
    except OSError as err:
        result.skip("unreadable", f"{where}: {err.strerror or err}")
        return
    if digest in seen:
        result.skip("duplicate", f"{where} (same bytes as {seen[digest]})")
        return
    seen[digest] = path.name
    key = sampling_key(video)
    settings = hashlib.sha256(key.encode()).hexdigest()[:16]
    folder = Path(video.frame_cache) / digest[:2] / digest / settings
    record = _cached_frames(folder)
    decoded: dict[int, np.ndarray] = {}
    if record is None:
        try:
            read = read_video(path, video, max_pixels=max_pixels)
        except BadVideo as err:
            result.skip(err.reason, f"{where}: {err}")
            return
        record = {"video": path.relative_to(raw).as_posix(), "sha256": digest, "sampling": key,
                  "shots": read.shots, "candidates": read.candidates, "rotation": read.rotation, "stats": read.stats,
                  "frames": [{"index": f.index, "time": round(f.time, 6), "shot": f.shot, "file": f"{f.index:08d}.png",
                              "width": int(f.rgb.shape[1]), "height": int(f.rgb.shape[0])} for f in read.frames]}
        with atomic_dir(folder) as tmp:
            for f, entry in zip(read.frames, record["frames"]):
                Image.fromarray(f.rgb).save(tmp / entry["file"], format="PNG", compress_level=1)
            atomic_write_json(tmp / FRAMES_FILE, record)
        decoded = {f.index: f.rgb for f in read.frames}
    result.video.update({"videos": 1, "shots": record["shots"], "candidates": record["candidates"],
                         "frames": len(record["frames"]), **record["stats"]})
    sidecar = path.with_suffix(".txt")
    caption = _read_sidecar(sidecar, result, max_caption_chars) if sidecar.is_file() else None
    group = f"{path.parent.name}/{path.stem}"
    rel = path.relative_to(raw).as_posix()
    for entry in record["frames"]:
        sha = hashlib.sha256(f"{digest}:{entry['index']}:{key}".encode()).hexdigest()
        image = RawImage(group, f"{rel}#{entry['index']:08d}", sha, entry["width"], entry["height"], caption, (),
                         clip=f"shot{entry['shot']}", frame_file=str(folder / entry["file"]))
        result.images.append(image)
        if on_decoded is not None and (known is None or known(sha) is None):  # its faces are not indexed yet
            rgb = decoded.get(entry["index"])
            on_decoded(image, rgb if rgb is not None else decode_rgb(image.frame_file, max_pixels=None)[0])


def _cached_frames(folder: Path) -> dict | None:
    """The frame cache's record of a video (its frames' files all present), or None."""
    try:
        record = json.loads((folder / FRAMES_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not all((folder / f["file"]).is_file() for f in record.get("frames", [])):
        return None
    return record
