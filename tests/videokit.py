"""Videos written here with PyAV (libx264 in MP4 unless told otherwise) for the video tests: shots of flat colour
with a moving block, frames stored sideways with a display matrix, variable frame rates, and broken files."""

from __future__ import annotations

import struct
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

MS = Fraction(1, 1000)


def shot_frame(colour, i: int, size=(96, 128)) -> np.ndarray:
    """Frame i of a shot: a flat background with a block that moves 3 px a frame, and a grid for texture."""
    img = np.zeros((*size, 3), np.uint8)
    img[:] = colour
    x = 10 + 3 * i
    img[20:60, x:x + 30] = 255 - np.asarray(colour, np.uint8)
    img[::7] //= 2
    return img


def write_video(path: Path, frames, *, durations_ms=None, fps: int = 10, codec: str = "libx264",
                container: str | None = None) -> Path:
    """Encode (H, W, 3) uint8 frames; durations_ms: each frame's duration (variable frame rate), else 1 / fps."""
    frames = list(frames)
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.time_base = MS
        stream.codec_context.time_base = MS
        t = 0
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = t, MS
            t += durations_ms[i] if durations_ms is not None else 1000 // fps
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def shots_video(path: Path, shots, **kw) -> Path:
    """shots: [(colour, n_frames), ...] back to back, hard cuts between them."""
    return write_video(path, [shot_frame(colour, i) for colour, n in shots for i in range(n)], **kw)


def display_rotated(path: Path, out: Path, degrees: int) -> Path:
    """A copy of an MP4 whose track header's matrix says: display rotated by `degrees` clockwise (as a phone
    records a portrait video on its landscape sensor)."""
    data = bytearray(path.read_bytes())
    i = data.index(b"tkhd")
    assert data[i + 4] == 0, "version 0 tkhd expected"
    cos, sin = {90: (0, 1), 180: (-1, 0), 270: (0, -1)}[degrees]
    matrix = [cos << 16, sin << 16, 0, -sin << 16, cos << 16, 0, 0, 0, 1 << 30]
    data[i + 44:i + 80] = struct.pack(">9i", *matrix)
    out.write_bytes(bytes(data))
    return out


def audio_only(path: Path) -> Path:
    """A Matroska file with one second of silence and no video stream."""
    with av.open(str(path), "w", format="matroska") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 8000), np.int16), format="s16", layout="mono")
        frame.sample_rate, frame.pts = 8000, 0
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def unknown_codec(path: Path, out: Path) -> Path:
    """A copy of a Matroska file whose video codec id names a codec FFmpeg does not know."""
    data = path.read_bytes()
    assert b"V_MPEG4/ISO/AVC" in data
    out.write_bytes(data.replace(b"V_MPEG4/ISO/AVC", b"V_UMO/NO/DECODE"))
    return out
