"""Reading videos (umo.data.video) on real files that PyAV encodes here: shots, sampling in time, the sharpness
floor, flat memory, seeking, upright frames, and every kind of bad file skipped with its reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from servers import free_port
from videokit import audio_only, display_rotated, shot_frame, shots_video, unknown_codec, write_video

from umo.config import VideoConfig
from umo.data.video import BadVideo, read_video

RED, GREEN, BLUE = (200, 30, 30), (30, 200, 30), (30, 30, 200)
EVERY = VideoConfig(fps=2.0, max_frames_per_shot=3, min_sharpness=5.0)


@pytest.fixture(scope="module")
def three_shots(tmp_path_factory):
    """2 s red, 1.5 s green, 2.5 s blue at 10 fps, a block moving inside each shot."""
    return shots_video(tmp_path_factory.mktemp("video") / "three.mp4", [(RED, 20), (GREEN, 15), (BLUE, 25)])


def test_shots_are_found_at_their_cuts_and_each_keeps_at_most_its_cap_spread_over_it(three_shots):
    read = read_video(three_shots, EVERY, max_pixels=None)
    assert read.shots == 3 and read.candidates == 12  # 6 s at 2 per second
    by_shot = {s: [f.time for f in read.frames if f.shot == s] for s in range(3)}
    assert by_shot == {0: [0.0, 1.0, 1.5], 1: [2.0, 2.5, 3.0], 2: [3.5, 4.5, 5.5]}  # the block moved: no cut
    assert [f.index for f in read.frames] == [round(t * 2) for s in range(3) for t in by_shot[s]]
    assert read.stats == {"blurry_frame": 0, "thinned_frame": 3}
    red = read.frames[0].rgb
    assert red.shape == (96, 128, 3) and np.abs(red[80:, :, 0].astype(int) - 200).mean() < 20


def test_a_long_shot_is_thinned_as_it_arrives_and_its_frames_spread_over_it(tmp_path):
    video = shots_video(tmp_path / "long.mp4", [(RED, 200)], fps=20)  # 10 s, one shot: 40 candidates at 4 fps
    read = read_video(video, VideoConfig(fps=4.0, max_frames_per_shot=3, min_sharpness=5.0), max_pixels=None)
    assert read.shots == 1 and read.candidates == 40 and len(read.frames) == 3
    times = [f.time for f in read.frames]
    assert times[0] == 0.0 and times[-1] >= 7.0 and read.stats["thinned_frame"] == 37


def test_frames_are_sampled_by_their_own_timestamps_at_a_variable_frame_rate(tmp_path):
    durations = np.random.default_rng(0).integers(40, 160, size=60).tolist()  # 25 to 10 fps, shuffled
    video = shots_video(tmp_path / "vfr.mp4", [(RED, 30), (GREEN, 30)], durations_ms=durations)
    read = read_video(video, VideoConfig(fps=1.0, max_frames_per_shot=10, min_sharpness=5.0), max_pixels=None)
    cut = sum(durations[:30]) / 1000
    starts = [np.cumsum([0, *durations])[i] / 1000 for i in range(60)]
    assert read.shots == 2
    for f in read.frames:  # each kept frame is the first one at or after its whole second
        assert f.time == min(t for t in starts if t >= f.index - 1e-6)
        assert f.shot == (f.time >= cut)


def test_a_rotated_phone_video_comes_out_upright(tmp_path):
    upright = shot_frame(RED, 0, size=(128, 96))  # a portrait frame
    upright[5:25, 5:25] = (250, 250, 0)  # a yellow mark top left
    sideways = np.ascontiguousarray(np.rot90(upright, k=1))  # as the sensor stores it
    stored = write_video(tmp_path / "stored.mp4", [sideways] * 10)
    video = display_rotated(stored, tmp_path / "phone.mp4", 90)
    read = read_video(video, EVERY, max_pixels=None)
    frame = read.frames[0].rgb
    assert read.rotation == -90 and frame.shape == (128, 96, 3)
    assert np.abs(frame.astype(int) - upright.astype(int)).mean() < 8  # codec loss only
    assert frame[10:20, 10:20].mean(axis=(0, 1))[2] < 80 and frame[10:20, 10:20].mean() > 150  # yellow, top left


def test_seeking_over_long_gaps_keeps_exactly_the_frames_of_a_full_decode(tmp_path):
    video = shots_video(tmp_path / "gaps.mp4", [(RED, 150), (BLUE, 150)], fps=10)  # 30 s, keyframe every 25
    sparse = dict(fps=0.2, max_frames_per_shot=10, min_sharpness=5.0)  # one candidate every 5 s
    seeking = read_video(video, VideoConfig(**sparse, seek_seconds=2.0), max_pixels=None)
    decoding = read_video(video, VideoConfig(**sparse, seek_seconds=1e9), max_pixels=None)
    assert [f.time for f in seeking.frames] == [f.time for f in decoding.frames] == [0, 5, 10, 15, 20, 25]
    assert all(np.array_equal(a.rgb, b.rgb) for a, b in zip(seeking.frames, decoding.frames))
    assert [f.shot for f in seeking.frames] == [0, 0, 0, 1, 1, 1]


def test_blurry_frames_fall_below_the_sharpness_floor_and_are_counted(tmp_path):
    flat = [np.full((96, 128, 3), 120, np.uint8)] * 20  # no edge at all
    video = write_video(tmp_path / "flat.mp4", flat)
    read = read_video(video, EVERY, max_pixels=None)
    assert read.frames == [] and read.stats["blurry_frame"] == read.candidates == 4


@pytest.mark.parametrize("case", ["empty", "text", "cut_mp4", "cut_mkv", "audio_only", "unknown_codec", "huge"])
def test_a_bad_video_is_refused_with_its_reason_and_its_name(tmp_path, case):
    good = shots_video(tmp_path / "good.mp4", [(RED, 30), (GREEN, 30)])
    path = tmp_path / f"{case}.mkv"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "text":
        path.write_bytes(b"not a video at all\n" * 20)
    elif case == "cut_mp4":  # cut before the index at its end
        path = tmp_path / "cut.mp4"
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif case == "cut_mkv":  # opens, then its frames stop halfway through the duration it claims
        whole = shots_video(tmp_path / "whole.mkv", [(RED, 30), (GREEN, 30)], container="matroska")
        path.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * 0.6)])
    elif case == "audio_only":
        audio_only(path)
    elif case == "unknown_codec":
        unknown_codec(shots_video(tmp_path / "ok.mkv", [(RED, 10)], container="matroska"), path)
    elif case == "huge":
        path = good
    reason = {"empty": "empty_file", "text": "not_a_video", "cut_mp4": "truncated", "cut_mkv": "truncated",
              "audio_only": "no_video_stream", "unknown_codec": "unsupported_codec", "huge": "too_large"}[case]
    with pytest.raises(BadVideo, match=str(path)) as err:
        read_video(path, EVERY, max_pixels=100 * 100 if case == "huge" else None)
    assert err.value.reason == reason


def toy_videos(toy_world, folder: Path, videos=range(3)) -> None:
    """Videos of two held-out people each, three shots apiece (another setting and pose per shot, the people
    moving within it), 2 s a shot."""
    from umo.toy.world.identity import make_identity
    from umo.toy.world.render import render_scene

    seed, first = toy_world.config.world_seed, toy_world.config.n_train_identities
    folder.mkdir(parents=True, exist_ok=True)
    for v in videos:
        people = [make_identity(seed, first + 2 * v), make_identity(seed, first + 2 * v + 1)]
        frames = []
        for shot in range(3):
            scene = render_scene(seed, people, np.random.default_rng(100 * v + shot), (192, 256)).image
            frames += [np.ascontiguousarray(np.roll(scene, 2 * i, axis=1)) for i in range(8)]
        write_video(folder / f"v{v}.mp4", frames, fps=4)


def prepare_videos(toy_world, tmp: Path, run: str, processes: int = 1) -> dict:
    """`umo prepare` of tmp/data with its own output and caches (tmp/<run>-*): in this process, or on several
    (torchrun, the CLI); returns its stats."""
    from test_prepare import prepare_args

    from umo.config import load_config
    from umo.data.prepare import prepare

    settings = ["prepare.truth=null", "prepare.synthetic.count=0", "prepare.test_fraction=0.34",
                "prepare.video.fps=2", "prepare.video.max_frames_per_shot=2",
                f"prepare.video.frame_cache={tmp / (run + '-frames')}", f"prepare.out={tmp / (run + '-prepared')}",
                f"prepare.face_cache={tmp / (run + '-faces')}"]
    cmd = prepare_args(toy_world, tmp, *settings)
    if processes == 1:
        config = load_config(cmd[3], [a for a in cmd[4:] if a != "-S"])
        return prepare(config.prepare, faces=config.faces, generator=config.generator, seed=config.seed).stats
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", "umo.cli", *cmd[1:]]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, env=os.environ | {"OMP_NUM_THREADS": "1"},
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp / f"{run}-prepared" / "stats.json").read_text())


def shots_by_sample(frames: Path) -> dict[str, tuple[str, int]]:
    """sample id of each kept frame -> (video, shot), from the frame cache's records."""
    from umo.data.ingest import RawImage
    from umo.data.prepare import sample_ids

    out = {}
    for record in map(json.loads, map(Path.read_text, frames.rglob("frames.json"))):
        images = [RawImage("clips/" + Path(record["video"]).stem, f"{record['video']}#{f['index']:08d}", "", 1, 1)
                  for f in record["frames"]]
        for sid, f in zip(sample_ids(images).values(), record["frames"]):
            out[sid] = (record["video"], f["shot"])
    return out


def test_prepare_takes_each_video_as_a_group_and_references_from_other_shots(toy_world, tmp_path):
    """Two videos and a broken one, then a third video added: `umo prepare` finds the shots, samples their frames
    and builds samples whose references all come from another shot of the target's video. The added video is the
    only one read and indexed on the rerun, which runs on 2 processes (sharded indexing) and gives the manifests
    that 1 process gives from scratch."""
    from umo.data.manifest import load_embeddings, read_manifest
    from umo.data.prepare import SAMPLES_DIR

    folder = tmp_path / "data" / "clips"
    toy_videos(toy_world, folder, videos=range(2))
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)
    first = prepare_videos(toy_world, tmp_path, "a")
    assert first["video"]["videos"] == 2 and first["video"]["shots"] == 6 and first["video"]["frames"] == 12
    assert first["rejects"]["files"] == {"truncated": 1} and first["images"]["usable"] == 12
    kept = {p: p.stat().st_mtime_ns for p in (tmp_path / "a-frames").rglob("*.png")}

    toy_videos(toy_world, folder, videos=[2])  # one more video: only it is read and indexed
    sharded = prepare_videos(toy_world, tmp_path, "a", processes=2)
    assert sharded["video"] == {**sharded["video"], "videos": 3, "shots": 9, "frames": 18}
    assert sharded["images"]["index_cached"] == 18 and sharded["images"]["usable"] == 18
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # the first two videos' frames were not written again
    scratch = prepare_videos(toy_world, tmp_path, "b")  # 1 process, nothing cached
    assert scratch["images"]["index_computed"] == 18

    shot_of = shots_by_sample(tmp_path / "a-frames")
    for split in ("train", "test"):
        ours, theirs = (read_manifest(tmp_path / f"{r}-prepared" / SAMPLES_DIR / f"{split}.json") for r in "ab")
        assert ours.samples == theirs.samples
        a, b = load_embeddings(ours), load_embeddings(theirs)
        assert a.keys() == b.keys() and all(np.allclose(a[k], b[k], atol=1e-5) for k in a)
        for s in ours.samples:
            video, shot = shot_of[s.id]
            assert len(s.references) == 2
            for ref in s.references:
                ref_video, ref_shot = shot_of[Path(ref.path).stem.rsplit("-f", 1)[0]]
                assert ref_video == video and ref_shot != shot, (s.id, ref.path)
    assert len(ours.samples) + len(read_manifest(tmp_path / "a-prepared" / SAMPLES_DIR / "train.json").samples) >= 9
