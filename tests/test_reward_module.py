"""MatchingReward end to end on images with faces pasted at known landmarks, through the real face code:
ONNX detector routed by insightface, differentiable warp, ArcFace IResNet (random weights), Hungarian."""

import numpy as np
import pytest
import torch

from umo.faces.align import similarity_transforms, warp_faces
from umo.faces.detect import FaceDetector
from umo.faces.embed import ArcFaceEmbedder, iresnet
from umo.reward import MatchingReward
from umo.toy.onnx_export import export_detector_onnx
from umo.toy.tiny.faces import MarkerDetector, identity_patch, paste_faces, random_background

SIZE, FACE = 256, 72
SLOTS = [(48.0, 128.0), (128.0, 128.0), (208.0, 128.0)]


@pytest.fixture(scope="module")
def reward_parts(tmp_path_factory):
    path = export_detector_onnx(MarkerDetector(face_size=FACE), tmp_path_factory.mktemp("det") / "det_marker.onnx")
    torch.manual_seed(0)
    embedder = ArcFaceEmbedder(iresnet("r18"))
    return FaceDetector(path), embedder


def to_tensor(images):
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def scene(ids, slots=SLOTS, seed=0):
    """One image with identity `ids[k]` at `slots[k]` (None = nobody there)."""
    faces = [(identity_patch(i, FACE), s) for i, s in zip(ids, slots) if i is not None]
    image, _ = paste_faces(random_background(seed, SIZE, SIZE), faces, FACE)
    return image


@pytest.fixture(scope="module")
def references(reward_parts):
    """Embeddings of identities 1, 2, 3 from their own reference photos (other backgrounds, other place)."""
    _, embedder = reward_parts
    crops = []
    for i in (1, 2, 3):
        image, lms = paste_faces(random_background(100 + i, SIZE, SIZE), [(identity_patch(i, FACE), (120.0, 100.0))], FACE)
        mats, valid = similarity_transforms(lms)
        crops.append(warp_faces(to_tensor([image]), torch.zeros(1, dtype=torch.long), mats))
    with torch.no_grad():
        return embedder(torch.cat(crops))


def test_identities_in_place_score_highest(reward_parts, references):
    detector, embedder = reward_parts
    mimr = MatchingReward(detector, embedder, kind="mimr")
    sir = MatchingReward(detector, embedder, kind="sir")
    cases = {
        "in place": [1, 2, 3],
        "duplicated": [1, 1, 3],  # identity 2 missing, identity 1 twice: the confusion MIMR exists to punish
        "stranger": [1, 7, 3],  # identity 2 replaced by someone who is not a reference
        "absent": [1, None, 3],  # identity 2 simply not generated
    }
    images = to_tensor([scene(ids, seed=k) for k, ids in enumerate(cases.values())])
    refs = [references] * len(cases)
    out = mimr.compute(images, refs)
    assert out.faces.tolist() == [3, 3, 3, 2]
    r = dict(zip(cases, out.rewards.tolist()))
    assert r["in place"] > r["duplicated"] + 1e-3
    assert r["in place"] > r["stranger"] + 1e-3
    # The paper's MIMR is a mean over all M x N pairs, so a missing face is not penalized as such: with equal
    # similarities, (3s - 6d)/9 == (2s - 4d)/6. What the test can promise is the hand-worked value.
    sim = out.similarities[3].double()
    w = -torch.ones_like(sim)
    w[0, 0] = w[2, 1] = 1
    assert r["absent"] == pytest.approx(float((w * sim).mean()), abs=1e-5)
    # SIR scores each reference alone: its best face. A reference with no face of its own loses.
    s = dict(zip(cases, sir(images, refs).tolist()))
    assert s["in place"] > max(s["duplicated"], s["stranger"], s["absent"])
    # Parts add up to the reward.
    torch.testing.assert_close(out.matched + out.unmatched, out.rewards.detach())


def test_gradients_reach_face_pixels_only(reward_parts, references):
    detector, embedder = reward_parts
    reward = MatchingReward(detector, embedder)
    images = to_tensor([scene([1, 2, 3]), random_background(5, SIZE, SIZE)]).requires_grad_(True)
    out = reward.compute(images, [references, references])
    assert out.faces.tolist() == [3, 0]
    assert float(out.rewards[1].detach()) == 0.0
    out.rewards.sum().backward()
    grad = images.grad
    assert torch.isfinite(grad).all()
    assert grad[0].abs().sum() > 0
    assert grad[1].abs().sum() == 0  # no face: no gradient
    assert grad[0, :, 200:, :].abs().sum() == 0  # far below every face crop
    assert all(p.grad is None for p in embedder.parameters())


def test_batched_equals_one_by_one(reward_parts, references):
    detector, embedder = reward_parts
    reward = MatchingReward(detector, embedder)
    images = to_tensor([scene([1, 2, 3]), scene([3, 1, None], seed=1), scene([2, 2, 2], seed=2)])
    refs = [references, references[:2], references[1:]]
    batched = reward(images, refs)
    single = torch.cat([reward(images[i : i + 1], refs[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_one_embedder_forward_and_one_detector_run_per_batch(reward_parts, references):
    detector, embedder = reward_parts
    reward = MatchingReward(detector, embedder)
    calls = {"embed": 0, "detect": 0}
    hook = embedder.register_forward_hook(lambda *a: calls.__setitem__("embed", calls["embed"] + 1))
    session = detector.session
    run = session.run

    def counting_run(*args, **kwargs):
        calls["detect"] += 1
        return run(*args, **kwargs)

    session.run = counting_run
    try:
        reward(to_tensor([scene([1, 2, 3], seed=s) for s in range(4)]), [references] * 4)
    finally:
        session.run = run
        hook.remove()
    assert calls == {"embed": 1, "detect": 1}


def test_target_faces_mode(reward_parts):
    """The public code's mode: references are the faces of the target image itself."""
    detector, embedder = reward_parts
    reward = MatchingReward(detector, embedder)
    target = to_tensor([scene([1, 2, 3])])
    refs = reward.embed_references(target)
    assert refs[0].shape == (3, 512) and not refs[0].requires_grad
    same = reward(target, refs)
    swapped = reward(to_tensor([scene([1, 1, 3])]), refs)
    assert float(same) > float(swapped)
    (largest,) = reward.embed_references(target, largest_only=True)
    assert largest.shape == (1, 512)
    empty = reward.embed_references(to_tensor([random_background(3, SIZE, SIZE)]))
    assert empty[0].shape[0] == 0
    assert float(reward(target, empty)) == 0.0


def test_a_face_partly_outside_the_image_is_kept_by_the_reward_and_the_judge_alike(reward_parts, references):
    """The reward and the judge make the same decision on a face with landmarks outside the image: both keep
    it, and both crop it with a black border (umo.reward.CROP_FILL), so their crops agree pixel for pixel up to
    OpenCV's fixed-point bilinear rounding."""
    from umo.eval.score import Judge
    from umo.faces.embed import norm_crops

    detector, embedder = reward_parts
    reward = MatchingReward(detector, embedder)
    # A face whose nose sits 8 px from the left edge: its left eye and mouth landmarks fall outside the image.
    image = scene([1, 2], slots=[(8.0, 128.0), (128.0, 128.0)])
    tensor = to_tensor([image])
    (det,), _ = reward.detect(tensor)
    assert len(det) == 2 and (det.landmarks[..., 0] < 0).any()
    faces, owner, degenerate = reward.align(tensor, [det])  # the reward's path
    (judged,) = Judge(detector, recognizer=None).detect([image])  # the judge's path
    crops, (usable,) = norm_crops([image], [judged])
    assert degenerate == 0 and faces.shape[0] == 2 and len(judged) == 2 and usable.all()
    np.testing.assert_allclose(judged.landmarks, det.landmarks, atol=1e-4)
    reward_px = ((faces.detach().permute(0, 2, 3, 1).double() + 1) * 127.5).numpy()
    border = crops == 0  # the judge's black border (and any black pixels of the face itself)
    assert border[0].mean() > 0.05 or border[1].mean() > 0.05  # the cut face's crop is partly border
    assert np.abs(reward_px[border]).max() < 1.0  # black in the reward's crop too (gray would be 127.5)
    assert np.abs(reward_px - crops).max() < 1.5 and np.abs(reward_px - crops).mean() < 0.5
    out = reward.compute(tensor, [references])
    assert out.faces.tolist() == [2] and out.skipped["degenerate"] == 0 and torch.isfinite(out.rewards).all()


def test_max_faces_and_min_face_size(reward_parts, references):
    detector, embedder = reward_parts
    images = to_tensor([scene([1, 2, 3])])
    out = MatchingReward(detector, embedder, max_faces=2).compute(images, [references])
    assert out.faces.tolist() == [2] and out.skipped["over_max"] == 1
    out = MatchingReward(detector, embedder, min_face_size=FACE + 1).compute(images, [references])
    assert out.faces.tolist() == [0] and out.skipped["small"] == 3 and float(out.rewards) == 0.0


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda x: (x * 127.5 + 127.5).to(torch.uint8), "float tensor"),
        (lambda x: x * 127.5 + 127.5, r"values in \[-1, 1\]"),
        (lambda x: x[0], r"shape \(B, 3, H, W\)"),
        (lambda x: torch.cat([x, x[:, :1]], dim=1), "3 \\(RGB\\) channels"),
        (lambda x: x.index_fill(3, torch.tensor([0]), float("nan")), "NaN or inf"),
        (lambda x: x.index_fill(3, torch.tensor([0]), float("inf")), "NaN or inf"),
        (lambda x: x.numpy(), "torch tensor"),
    ],
)
def test_bad_images(reward_parts, references, make, message):
    reward = MatchingReward(*reward_parts)
    with pytest.raises(ValueError, match=message):
        reward(make(to_tensor([scene([1, 2, 3])])), [references])


def test_bad_references(reward_parts, references):
    reward = MatchingReward(*reward_parts)
    images = to_tensor([scene([1, 2, 3])])
    with pytest.raises(ValueError, match="one \\(M_i, D\\) tensor per image"):
        reward(images, [references, references])
    with pytest.raises(ValueError, match="NaN or inf"):
        reward(images, [references * float("nan")])
    with pytest.raises(ValueError, match="embedder gives 512"):
        reward(images, [references[:, :128]])
    with pytest.raises(ValueError, match="expected 'mimr' or 'sir'"):
        MatchingReward(*reward_parts, kind="ppo")


def test_degenerate_landmarks_are_skipped_and_counted(reward_parts, references):
    """Collinear, coincident or non-finite landmarks (a detector can emit them) never crash the reward."""
    from umo.faces.types import Detections

    detector, embedder = reward_parts
    reward = MatchingReward(detector, embedder)
    images = to_tensor([scene([1, 2, 3])]).requires_grad_(True)
    (good,) = reward.detect(images)[0]
    bad = np.stack([
        np.stack([np.linspace(60, 100, 5), np.full(5, 120.0)], axis=1),  # collinear
        np.full((5, 2), 128.0),  # one point
        np.full((5, 2), np.nan),  # non-finite
    ]).astype(np.float32)
    det = Detections(
        np.concatenate([good.boxes, np.tile(good.boxes[:1], (3, 1))]),
        np.concatenate([good.landmarks, bad]),
        np.concatenate([good.scores, np.full(3, 0.9, np.float32)]),
    )
    faces, owner, skipped = reward.align(images, [det])
    assert skipped == 3 and faces.shape == (3, 3, 112, 112) and owner.tolist() == [0, 0, 0]
    rewards = reward.score(reward.embed(faces), owner, [references])[0]
    rewards.sum().backward()
    assert torch.isfinite(rewards).all() and torch.isfinite(images.grad).all()

    # compute() keeps the scored faces' boxes, in the similarity columns' order, without the degenerate ones
    class Fixed:
        def detect_tensor(self, images):
            return [det, Detections(good.boxes[1:2] + 7, good.landmarks[1:2] + 7, good.scores[1:2])]

    out = MatchingReward(Fixed(), embedder).compute(images.detach().repeat(2, 1, 1, 1), [references] * 2)
    assert out.skipped["degenerate"] == 3 and out.faces.tolist() == [3, 1]
    assert [b.shape for b in out.boxes] == [(3, 4), (1, 4)] and [s.shape[1] for s in out.similarities] == [3, 1]
    np.testing.assert_allclose(out.boxes[0], good.boxes)
    np.testing.assert_allclose(out.boxes[1], good.boxes[1:2] + 7)


def test_from_config_loads_the_configured_files(tmp_path, references):
    """params.yaml -> MatchingReward: the detector pack and the embedder checkpoint through the real loaders."""
    from safetensors.torch import save_file

    from umo.config import load_config

    export_detector_onnx(MarkerDetector(face_size=FACE), tmp_path / "pack" / "det_marker.onnx")
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in iresnet("r18").state_dict().items()}, str(tmp_path / "r18.safetensors"))
    config = load_config(None, [
        f"faces.detector.root={tmp_path}", "faces.detector.pack=pack",
        f"faces.embedder.path={tmp_path / 'r18.safetensors'}", "faces.embedder.arch=r18",
        "reward.kind=sir", "reward.max_faces=2",
    ])
    reward = MatchingReward.from_config(config.faces, config.reward)
    assert reward.kind == "sir" and reward.max_faces == 2
    out = reward.compute(to_tensor([scene([1, 2, 3])]), [references])
    assert out.faces.tolist() == [2] and out.skipped["over_max"] == 1
