"""Training data: a validated manifest's samples as tensors, and the deterministic, sharded batch order.

The order is a pure function of (seed, epoch, number of processes), not a DataLoader's hidden state, so the
position saved in a checkpoint (epoch, global batches consumed) resumes exactly where the run stopped:

- each epoch shuffles the sample indices with numpy's RNG seeded by (seed, epoch);
- samples are bucketed by their number of references (a batch must share the reference layout), cut into
  batches of `batch_size` (an incomplete last batch of a bucket is dropped) and the batches shuffled;
- the batch list is truncated to a multiple of the number of processes, and process r takes batches
  r, r + W, r + 2W ... so every process runs the same number of steps and no sample is seen twice per epoch.

`manifest_fingerprint` says whether two runs read the same data (`resume="auto"` in `umo.train.loop`).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from umo import images
from umo.data.manifest import Manifest, ManifestError
from umo.images import BadImage
from umo.io import sha256_file
from umo.train.rerefl import Batch


def epoch_batches(reference_counts: Sequence[int], *, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """All batches of one epoch (lists of sample indices), in training order, before sharding."""
    rng = np.random.default_rng([seed, epoch])
    buckets: dict[int, list[int]] = defaultdict(list)
    for i in rng.permutation(len(reference_counts)):
        buckets[reference_counts[i]].append(int(i))
    batches = [idx[k:k + batch_size] for _, idx in sorted(buckets.items())
               for k in range(0, len(idx) - batch_size + 1, batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def shard(batches: list[list[int]], rank: int, world_size: int) -> list[list[int]]:
    """Process `rank`'s batches: every world_size-th, after truncating to a multiple of world_size."""
    usable = len(batches) - len(batches) % world_size
    return batches[rank:usable:world_size]


def manifest_fingerprint(manifest: Manifest, file: str | Path) -> str:
    """sha256 over the manifest file and its embeddings file (whole) and the name and size of every image it
    names: a stat per image, no image read (data prep rewrites the manifest or the embeddings when it changes
    what an image shows; a same-named image of the same size and other content goes unnoticed)."""
    h = hashlib.sha256(f"{sha256_file(file)} {sha256_file(manifest.path(manifest.embeddings))}".encode())
    for rel in sorted({rel for s in manifest.samples for rel in (s.target, *(r.path for r in s.references))}):
        h.update(f"\n{rel} {manifest.path(rel).stat().st_size}".encode())
    return h.hexdigest()


def load_image(path: Path, size: Sequence[int]) -> torch.Tensor:
    """`umo.images.load_image`, for training: data prep validated every file, so one that still fails here stops
    training with its name (never trained on)."""
    try:
        return images.load_image(path, size)
    except BadImage as err:
        raise ManifestError(f"{path}: cannot read this image: {err}") from err


class TrainData:
    """The samples of a manifest, loaded on demand as `Batch`es.

    resolution: [H, W] of targets (the generated size); reference_resolution: [h, w] of every reference.
    """

    def __init__(self, manifest: Manifest, embeddings: dict[str, torch.Tensor], *, resolution: Sequence[int],
                 reference_resolution: Sequence[int]) -> None:
        if not manifest.samples:
            raise ManifestError(f"{manifest.root}: the {manifest.split!r} manifest has no samples")
        self.manifest = manifest
        self.embeddings = embeddings
        self.resolution = list(resolution)
        self.reference_resolution = list(reference_resolution)
        self.reference_counts = [len(s.references) for s in manifest.samples]

    def __len__(self) -> int:
        return len(self.manifest.samples)

    def batch(self, indices: Sequence[int]) -> Batch:
        samples = [self.manifest.samples[i] for i in indices]
        return Batch(
            prompts=[s.prompt for s in samples],
            references=[[load_image(self.manifest.path(r.path), self.reference_resolution) for r in s.references]
                        for s in samples],
            reference_embeddings=[self.embeddings[s.id] for s in samples],
            targets=torch.stack([load_image(self.manifest.path(s.target), self.resolution) for s in samples]),
            reference_files=[[self.manifest.path(r.path) for r in s.references] for s in samples])

    def batches_per_epoch(self, batch_size: int, world_size: int) -> int:
        """Per process (the same on every process)."""
        return len(shard(epoch_batches(self.reference_counts, batch_size=batch_size, seed=0, epoch=0), 0,
                         world_size))
