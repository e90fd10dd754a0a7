"""What training shows beside its loss: the pictures of the matching, and the judge's check on the reward.

Reward hacking. ReReFL climbs the reward embedder's similarity; a generator can learn what pleases that one
network (its blind spots, its preferred crops) without drawing the person better. Every `train.judge_every`
steps the main process scores the step's last micro-batch with the gate's judge too (a different network,
trained on other people: faces.judges' first), on the same images and the same references:

    guard/reward, guard/judge_reward   the reward's formula (MIMR or SIR, its weights) on the reward embedder's
                                       similarities, and on the judge's
    guard/reward_id_sim, guard/judge_id_sim   ID-Sim by each (per reference, its best face; 0 without faces)
    guard/reward_gap, guard/id_sim_gap        reward - judge: a gap that grows while the reward rises is the
                                              signature of hacking (the judge does not see what the reward sees)
    guard/samples                       samples scored (a sample with a reference the judge finds no face in
                                        is left out, and counted out)

These are measurements on a handful of training draws, a trend to watch, not a test: the evaluation's paired
intervals on held-out items decide.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from umo.eval.matching import matching_picture
from umo.eval.score import Judge
from umo.images import decode_rgb, signed_to_rgb
from umo.metrics import id_sim
from umo.reward import matching_weights, single_identity_reward
from umo.train.rerefl import Batch, StepOutput

PICTURE_HEIGHT = 192  # px of each generated image in the training's pictures of the matching


def reference_images(batch: Batch, i: int) -> list[np.ndarray]:
    """Sample i's reference images as RGB uint8: the files at full size when the batch knows them, else the
    conditioning tensors."""
    if batch.reference_files is not None:
        return [decode_rgb(p, max_pixels=None)[0] for p in batch.reference_files[i]]
    return [signed_to_rgb(r) for r in batch.references[i]]


def matching_pictures(batch: Batch, output: StepOutput, *, height: int = PICTURE_HEIGHT) -> list[np.ndarray]:
    """Per sample, the picture of the REWARD's matching on its x0_hat (umo.eval.matching): the faces the reward
    scored, its Hungarian pairs and their similarities (the reward embedder's)."""
    images = signed_to_rgb(output.images)
    return [matching_picture(images[i], output.boxes[i], output.similarities[i].float().cpu().numpy(),
                             reference_images(batch, i), height=height) for i in range(len(images))]


def _formula(sim: np.ndarray, kind: str, matched_weight: float, unmatched_weight: float) -> float:
    """The reward of one sample from its (M, N) similarities: MIMR's weighted mean or SIR; 0 without faces."""
    if sim.size == 0:
        return 0.0
    if kind == "sir":
        return float(single_identity_reward(sim))
    w = matching_weights(sim, matched_weight=matched_weight, unmatched_weight=unmatched_weight)
    return float((w * sim).sum() / sim.size)


class JudgeCheck:
    """The judge's check of the reward on training draws (see the module docstring). Reference embeddings are
    cached per file: a reference is detected and embedded once per run."""

    def __init__(self, judge: Judge, *, kind: str, matched_weight: float, unmatched_weight: float) -> None:
        self.judge, self.kind = judge, kind
        self.weights = (matched_weight, unmatched_weight)
        self._references: dict[Path, np.ndarray | None] = {}

    def _reference(self, batch: Batch, i: int) -> np.ndarray | None:
        """Sample i's (M, D) judge embeddings, None when the judge finds no face in one of its references."""
        if batch.reference_files is None:
            emb, missing = self.judge.references(reference_images(batch, i))
            return None if missing else emb
        todo = [p for p in batch.reference_files[i] if p not in self._references]
        if todo:
            emb, missing = self.judge.references([decode_rgb(p, max_pixels=None)[0] for p in todo])
            for r, p in enumerate(todo):
                self._references[p] = None if r in missing else emb[r]
        rows = [self._references[p] for p in batch.reference_files[i]]
        return None if any(r is None for r in rows) else np.stack(rows)

    def __call__(self, batch: Batch, output: StepOutput) -> dict[str, float]:
        images = list(signed_to_rgb(output.images))
        found = self.judge.faces(images)
        rows = []
        for i, (_, faces) in enumerate(found):
            refs = self._reference(batch, i)
            if refs is None:
                continue
            by_judge = refs @ np.asarray(faces).reshape(-1, refs.shape[1]).T
            by_reward = output.similarities[i].double().cpu().numpy()
            rows.append((float(output.rewards[i]), _formula(by_judge, self.kind, *self.weights),
                         float(np.mean(id_sim(by_reward))), float(np.mean(id_sim(by_judge)))))
        if not rows:
            return {"guard/samples": 0.0}
        reward, judge, reward_sim, judge_sim = (float(v) for v in np.mean(rows, axis=0))
        return {"guard/reward": reward, "guard/judge_reward": judge, "guard/reward_gap": reward - judge,
                "guard/reward_id_sim": reward_sim, "guard/judge_id_sim": judge_sim,
                "guard/id_sim_gap": reward_sim - judge_sim, "guard/samples": float(len(rows))}

