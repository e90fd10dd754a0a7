"""Videos of the raw collection: decoded with PyAV, cut into shots, sampled into frames, with flat memory.

A video is read once, front to back, and only what is kept is converted and held:

- sampling: one candidate frame every 1 / `fps` seconds of presentation time (each frame's own timestamp, so a
  variable frame rate samples evenly in time). Where the next candidate is more than `seek_seconds` ahead, the
  reader seeks to the keyframe before it instead of decoding the frames between;
- shots: a content detector on the candidates. Each is reduced to a 16 x 16 x 16-bin HSV histogram (of a
  thumbnail); a cut lies between two candidates whose histograms' L1 distance (half the sum of absolute
  differences, 0..1) is >= `cut_threshold`. People moving within a shot move pixels, not the scene's colours;
  a cut to another camera changes them. A shot shorter than the sampling step can be missed (it has no
  candidate then), and a slow dissolve may not cross the threshold;
- frames: per shot, candidates whose sharpness (variance of the Laplacian of the grey thumbnail) is below
  `min_sharpness` are dropped (counted: blurry_frame), and at most `max_frames_per_shot` are kept, spread over
  the shot. The current shot's candidates are thinned as they arrive (every second one dropped whenever twice
  the cap has gathered), so memory never holds more than 2 x cap frames, whatever the length of the video;
- upright: a rotation in the stream's display matrix (phone videos) is applied to every frame.

A video that cannot be used raises `BadVideo` with a stats reason: empty_file, not_a_video (no container PyAV
knows), no_video_stream, unsupported_codec (no decoder for it), too_large (more pixels per frame than
`max_pixels`, the images' guard), truncated (decoding failed, or nothing decodable). Frames already read of a
truncated video are not used: a video is used whole or not at all.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from umo.config import VideoConfig
from umo.progress import progress

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm")
THUMB_SIDE = 64  # px: the longer side of the thumbnail that histograms and sharpness are measured on


class BadVideo(Exception):
    """A video that is skipped; `reason` is its stats key, the message names the file and the problem."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def sampling_key(sampling: VideoConfig) -> str:
    """The settings that decide which frames are kept, as text: part of each frame's cache key (seek_seconds
    only changes how they are reached)."""
    return (f"fps={sampling.fps:g},max={sampling.max_frames_per_shot},sharp={sampling.min_sharpness:g},"
            f"cut={sampling.cut_threshold:g}")


@dataclass
class VideoFrame:
    shot: int  # 0, 1, ... in order
    index: int  # the candidate's number: round(time * fps), stable for a video and its sampling settings
    time: float  # seconds
    sharpness: float
    rgb: np.ndarray  # (H, W, 3) uint8, upright


@dataclass
class VideoRead:
    frames: list[VideoFrame]
    shots: int
    candidates: int
    width: int
    height: int
    rotation: int
    stats: dict[str, int] = field(default_factory=dict)  # blurry_frame, thinned_frame


def read_video(path: str | Path, sampling: VideoConfig, *, max_pixels: int | None) -> VideoRead:
    """The kept frames of one video (see the module docstring); raises BadVideo."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise BadVideo("empty_file", f"{path}: empty file")
    # lazy: PyAV loads FFmpeg's libraries; image-only collections never need them
    import av

    try:
        container = av.open(str(path))
    except av.error.FFmpegError as err:
        if _looks_like_video(path):  # an MP4 cut before its index (moov), a Matroska file cut in its header
            raise BadVideo("truncated", f"{path}: a video container that cannot be opened: cut short? ({err})") from err
        raise BadVideo("not_a_video", f"{path}: not a video PyAV can open ({err})") from err
    with container:
        if not container.streams.video:
            raise BadVideo("no_video_stream", f"{path}: no video stream")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        try:
            av.codec.Codec(ctx.name, "r")
        except (AttributeError, av.codec.codec.UnknownCodecError) as err:
            raise BadVideo("unsupported_codec", f"{path}: no decoder for its video codec "
                                                f"({getattr(ctx, 'name', None)!r})") from err
        width, height = int(ctx.width or 0), int(ctx.height or 0)
        if max_pixels is not None and width * height > max_pixels:
            raise BadVideo("too_large", f"{path}: {width}x{height} pixels per frame > {max_pixels}")
        stream.thread_type = "AUTO"
        reader = _ShotReader(sampling)
        rotation, seen = 0, {"last": None}
        duration = container.duration / 1e6 if container.duration else None  # the container's own claim, s
        # a bar per video over its seconds (a line every 30 s away from a terminal: umo.progress)
        bar = progress(total=math.ceil(duration) if duration else None, desc=f"video {path.name}", unit="s",
                       stage=False)
        try:
            for frame in _candidates(container, stream, sampling, seen):
                rotation = int(getattr(frame, "rotation", 0) or 0)
                reader.add(frame.time, _upright(frame.to_ndarray(format="rgb24"), rotation))
                if int(frame.time) > bar.n:
                    bar.update(int(frame.time) - bar.n)
        except av.error.FFmpegError as err:
            raise BadVideo("truncated", f"{path}: decoding failed ({err})") from err
        except (av.codec.codec.UnknownCodecError, NotImplementedError) as err:
            raise BadVideo("unsupported_codec", f"{path}: {err}") from err
        finally:
            bar.close()
        reader.close()
    if reader.candidates == 0:
        raise BadVideo("truncated", f"{path}: no decodable frame")
    if duration is not None and seen["last"] is not None and duration - seen["last"] > max(2.0 / sampling.fps, 1.0):
        raise BadVideo("truncated", f"{path}: frames end at {seen['last']:.1f} s of the {duration:.1f} s it claims")
    return VideoRead(reader.frames, reader.shot + 1, reader.candidates, width, height, rotation, reader.stats)


def _looks_like_video(path: Path) -> bool:
    """An ISO media (MP4, MOV) or Matroska / WebM signature in the first bytes."""
    with open(path, "rb") as f:
        head = f.read(12)
    return head[4:8] == b"ftyp" or head[:4] == b"\x1a\x45\xdf\xa3"


def _candidates(container, stream, sampling: VideoConfig, seen: dict) -> Iterator:
    """The first decoded frame at or after each sampling time, in order; seeks over long gaps. seen["last"]: the
    time of the last frame decoded."""
    step = 1.0 / sampling.fps
    next_time = 0.0
    base = stream.time_base
    while True:
        advanced = False
        for frame in container.decode(stream):
            if frame.time is None:
                continue
            seen["last"] = frame.time
            if frame.time + 1e-6 < next_time:
                continue
            yield frame
            advanced = True
            next_time = (int(frame.time / step + 1e-6) + 1) * step
            if next_time - frame.time > sampling.seek_seconds:
                break  # seek there instead of decoding everything in between
        else:
            return  # the end of the stream
        if not advanced:
            return
        container.seek(int(next_time / base), stream=stream, backward=True, any_frame=False)


def _upright(rgb: np.ndarray, rotation: int) -> np.ndarray:
    """The frame as it is meant to be seen: the display matrix's rotation (degrees, counter-clockwise) undone."""
    turns = (rotation // 90) % 4
    return np.ascontiguousarray(np.rot90(rgb, k=turns)) if turns else rgb


def _thumbnail(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    scale = THUMB_SIDE / max(h, w)
    return cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def histogram(rgb: np.ndarray) -> np.ndarray:
    """The frame's HSV colour histogram (16 x 16 x 16 bins of its thumbnail), summing to 1."""
    hsv = cv2.cvtColor(_thumbnail(rgb), cv2.COLOR_RGB2HSV)
    hist = cv2.calcHist([hsv], [0, 1, 2], None, [16, 16, 16], [0, 180, 0, 256, 0, 256]).ravel()
    return hist / max(float(hist.sum()), 1.0)


def sharpness(rgb: np.ndarray) -> float:
    """Variance of the Laplacian of the grey frame, at its full size (blur lowers it)."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


class _ShotReader:
    """Cuts candidates into shots and keeps at most max_frames_per_shot sharp ones per shot, spread out."""

    def __init__(self, sampling: VideoConfig) -> None:
        self.s = sampling
        self.frames: list[VideoFrame] = []
        self.stats = {"blurry_frame": 0, "thinned_frame": 0}
        self.shot, self.candidates = 0, 0
        self._last_hist: np.ndarray | None = None
        self._pending: list[VideoFrame] = []
        self._stride = 1  # thinning: keep every stride-th sharp candidate of the shot
        self._seen = 0  # sharp candidates of the current shot

    def add(self, time: float, rgb: np.ndarray) -> None:
        hist = histogram(rgb)
        if self._last_hist is not None and 0.5 * float(np.abs(hist - self._last_hist).sum()) >= self.s.cut_threshold:
            self._end_shot()
            self.shot += 1
        self._last_hist = hist
        self.candidates += 1
        sharp = sharpness(rgb)
        if sharp < self.s.min_sharpness:
            self.stats["blurry_frame"] += 1
            return
        self._seen += 1
        if (self._seen - 1) % self._stride:
            self.stats["thinned_frame"] += 1
            return
        self._pending.append(VideoFrame(self.shot, round(time * self.s.fps), time, sharp, rgb))
        if len(self._pending) >= 2 * self.s.max_frames_per_shot:  # flat memory: drop every second, sample sparser
            self.stats["thinned_frame"] += len(self._pending) // 2
            self._pending = self._pending[::2]
            self._stride *= 2

    def _end_shot(self) -> None:
        pending, cap = self._pending, self.s.max_frames_per_shot
        if len(pending) > cap:  # spread: evenly over the shot
            keep = {round(i * (len(pending) - 1) / max(cap - 1, 1)) for i in range(cap)} if cap > 1 else {0}
            self.stats["thinned_frame"] += len(pending) - len(keep)
            pending = [f for i, f in enumerate(pending) if i in keep]
        self.frames.extend(pending)
        self._pending, self._stride, self._seen = [], 1, 0

    def close(self) -> None:
        self._end_shot()
