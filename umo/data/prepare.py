"""The data prep stage (`umo prepare`): raw collection -> face index -> identities -> samples -> manifests.

    prepare.raw (data/, tracked by data.dvc)
      -> scan and validate every file (umo.data.ingest: bad files skipped and counted)
      -> face index: detect + embed each image once, cached by content hash (umo.data.faces)
      -> identities: cluster each group's faces (umo.data.identities)
      -> real samples: targets with 1..N people, references from other images (umo.data.samples)
      -> split by group; a test identity also seen in train (linked) drops its test samples
      -> synthetic samples from train identities (umo.data.synthetic), train split only
      -> files and manifests

Outputs under prepare.out (default artifacts/prepared):

    samples/train.json  samples/test.json          manifests (schema umo.samples v1)
    samples/train_embeddings.safetensors  ...      the references' reward-embedder embeddings, from the index
    samples/targets/<sample id>.png                target images, decoded and upright (or generated)
    samples/references/<group>-<image>-f<k>.png    reference crops (prepare.reference_crop, reference_size)
    stats.json                                     DVC metrics: counts, rejects by reason, cluster quality
    skipped_files.jsonl                            each skipped input file: {"reason", "file"} (the first 10,000)
    contact_sheet.png                              random samples, references beside the target

`samples/` is built in a temporary sibling and renamed into place, then stats.json and the contact sheet are
written (each atomically): a crash leaves the previous outputs whole, and nothing reaches a manifest without
passing validation.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import Image

from umo.config import FacesConfig, GeneratorConfig, PrepareConfig
from umo.data.faces import FaceCache, FaceEmbedder, ImageFaces, face_sizes, index_collection, models_key
from umo.data.identities import cluster_faces, match_truth, purity_completeness
from umo.data.ingest import RawImage
from umo.data.manifest import Manifest, Reference, Sample, write_manifest
from umo.data.samples import (
    Composed,
    FaceKey,
    compose_group,
    crop_box,
    linked_to,
    people_prompt,
    split_groups,
    usable,
)
from umo.data.synthetic import generate, pick_identities, synthesize
from umo.faces.detect import FaceDetector
from umo.faces.embed import load_arcface
from umo.images import decode_rgb, load_image
from umo.io import atomic_dir, atomic_write_bytes, atomic_write_json, is_toy_world, sha256_file
from umo.models import load_generator
from umo.reward import CROP_FILL

log = logging.getLogger(__name__)

SAMPLES_DIR = "samples"
STATS_FILE = "stats.json"
SKIPPED_FILE = "skipped_files.jsonl"  # which files the counts of stats.json["rejects"]["files"] are
SHEET_FILE = "contact_sheet.png"
SYNTHETIC_GROUP = "synthetic"


@dataclass
class Identity:
    """One person of one group: a cluster of its faces."""

    name: str  # "<group>/p<label>"
    group: str
    faces: list[FaceKey]
    mean: np.ndarray  # mean of the faces' unit embeddings: mean . mean' = the faces' mean cosine similarity


@dataclass
class Group:
    name: str
    images: list[RawImage]
    faces: list[ImageFaces]
    labels: list[np.ndarray]
    samples: list[Composed] = field(default_factory=list)
    identities: dict[int, Identity] = field(default_factory=dict)


@dataclass
class PrepareResult:
    out: Path
    manifests: dict[str, Path]
    stats: dict[str, Any]


def _processes():
    """accelerate's PartialState where several processes run the stage (gloo on the CPU), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    # lazy: accelerate (and torch.distributed) only for a sharded run
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


_READABLE_GROUP = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._]{0,79}")  # no "-": the first "-" of an id ends the group
_READABLE_STEM = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")


def sample_ids(images: Sequence[RawImage]) -> dict[str, str]:
    """Each image's sample id (its path -> id), unique and safe as a file name by construction.

    `<group>-<stem>` where that is readable and unambiguous: the group holds no "-", both parts only letters,
    digits, ".", "_" (and "-" in the stem), and no other image of the group has the same stem. Anything else gets
    its unsafe characters replaced and the first 12 hex digits of its path's sha256 appended: `x.png` and `x.jpg`
    of one group, group `a` with `b-c.png` against group `a-b` with `c.png`, or a name with a newline all get
    distinct ids. A collision left after that (a file named like another's hashed id) is an error naming both.

    >>> from umo.data.ingest import RawImage
    >>> img = lambda path: RawImage(path.split("/")[0], path, "", 1, 1)
    >>> sample_ids([img("s1/shot_0.png"), img("a/b-c.png"), img("a-b/c.png")])  # doctest: +NORMALIZE_WHITESPACE
    {'s1/shot_0.png': 's1-shot_0', 'a/b-c.png': 'a-b-c', 'a-b/c.png': 'a_b-c-eab145adacbf'}
    """
    stems = Counter((i.group, PurePosixPath(i.path).stem) for i in images)
    ids: dict[str, str] = {}
    owner: dict[str, str] = {}
    for image in images:
        stem = PurePosixPath(image.path).stem
        if _READABLE_GROUP.fullmatch(image.group) and _READABLE_STEM.fullmatch(stem) and \
                stems[(image.group, stem)] == 1:
            sid = f"{image.group}-{stem}"
        else:
            digest = hashlib.sha256(image.path.encode("utf-8", "surrogateescape")).hexdigest()[:12]
            sid = f"{_safe_part(image.group)}-{_safe_part(stem)}-{digest}"
        if sid in owner:
            raise ValueError(f"sample id {sid!r}: both {owner[sid]} and {image.path} (under prepare.raw) would get "
                             "it; rename one of the two files")
        owner[sid] = image.path
        ids[image.path] = sid
    return ids


def _safe_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._]", "_", text)[:60].lstrip(".") or "_"


def build_groups(images: list[RawImage], faces: dict[str, ImageFaces], *, settings: PrepareConfig) -> list[Group]:
    """Per group (in scan order): its images and faces, each face's cluster label, and its identities."""
    p = settings
    by_group: dict[str, list[RawImage]] = {}
    for image in images:
        by_group.setdefault(image.group, []).append(image)
    groups = []
    for name, members in by_group.items():
        fs = [faces[i.sha256] for i in members]
        flat = np.concatenate([f.embeddings for f in fs]) if fs else np.zeros((0, 1), np.float32)
        owners = [k for k, f in enumerate(fs) for _ in range(len(f))]
        flat_labels = cluster_faces(flat, p.cluster_threshold, images=owners)
        bounds = np.cumsum([0] + [len(f) for f in fs])
        labels = [flat_labels[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        group = Group(name, members, fs, labels)
        for label in dict.fromkeys(flat_labels.tolist()):
            keys = [FaceKey(i, k) for i, lab in enumerate(labels) for k in np.flatnonzero(lab == label).tolist()]
            mean = np.mean([fs[key.image].embeddings[key.face] for key in keys], axis=0)
            group.identities[label] = Identity(f"{name}/p{label + 1}", name, keys, mean)
        groups.append(group)
    return groups


def read_truth(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """Ground truth by (group, image file name); a malformed line is an error naming the file and line."""
    truth = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            truth[(str(row["group"]), str(row["image"]))] = {"boxes": np.asarray(row["boxes"], np.float64),
                                                           "identity_ids": list(row["identity_ids"]),
                                                           "caption": row.get("caption")}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}:{n}: not a ground-truth line ({{group, image, boxes, identity_ids}}): "
                             f"{err}") from err
    return truth


def truth_ids(groups: list[Group], truth: dict[tuple[str, str], dict[str, Any]]) -> dict[str, list[list | None]]:
    """Per group, per image: the true identity of each detected face (None: no true face matches), or None for
    an image the truth lacks. Matched once, for every report that needs it."""
    out: dict[str, list[list | None]] = {}
    for g in groups:
        rows = [truth.get((g.name, PurePosixPath(image.path).name)) for image in g.images]
        out[g.name] = [None if row is None else match_truth(f.boxes, row["boxes"], row["identity_ids"])
                       for f, row in zip(g.faces, rows)]
    return out


def cluster_quality(groups: list[Group], ids: dict[str, list[list | None]]) -> dict[str, Any]:
    """Purity and completeness of the clusters against the truth's identities (`truth_ids`) within each group
    (clustering never links groups). Detections that match no true face (or lie in an image the truth lacks) are
    counted in `faces_without_truth`, not scored."""
    predicted, actual, unmatched, missing = [], [], 0, 0
    for g in groups:
        for f, labels, image_ids in zip(g.faces, g.labels, ids[g.name]):
            if image_ids is None:
                missing += 1
                unmatched += len(f)
                continue
            for label, true_id in zip(labels.tolist(), image_ids):
                if true_id is None:
                    unmatched += 1
                else:
                    predicted.append((g.name, label))
                    actual.append((g.name, true_id))
    purity, completeness = purity_completeness(predicted, actual)
    return {"purity": round(purity, 4), "completeness": round(completeness, 4), "faces_scored": len(predicted),
            "faces_without_truth": unmatched, "images_without_truth": missing}


def split_leaks(train: list[Sample], test: list[Sample], truth_ids: dict[str, Any]) -> int:
    """True identities (per `truth_ids`: identity name -> true id) present in both splits."""
    def ids(samples):
        return {truth_ids.get(r.identity) for s in samples for r in s.references} - {None}
    return len(ids(train) & ids(test))


class _Images:
    """Decoded raw images, one group at a time (references and targets come from the same few files)."""

    def __init__(self, raw: Path, max_pixels: int) -> None:
        self.raw, self.max_pixels, self.cache = raw, max_pixels, {}

    def __call__(self, image: RawImage) -> np.ndarray:
        if image.path not in self.cache:
            if len(self.cache) > 64:
                self.cache.clear()
            source = Path(image.frame_file) if image.frame_file else self.raw / image.path  # a video frame: its PNG
            rgb, _ = decode_rgb(source, max_pixels=self.max_pixels)
            self.cache[image.path] = rgb
        return self.cache[image.path]


def _reference_crop(rgb: np.ndarray, box: np.ndarray, p) -> np.ndarray:
    x1, y1, x2, y2 = crop_box(box, rgb.shape[:2], policy=p.reference_crop, margin=p.crop_margin)
    crop = Image.fromarray(rgb[y1:y2, x1:x2])
    return np.asarray(crop.resize((p.reference_size, p.reference_size), Image.Resampling.BICUBIC))


def _load_models(faces: FacesConfig, batch: int, device: str):
    detector = FaceDetector.from_config(faces.detector, providers=faces.providers)
    embedder = load_arcface(faces.embedder.path, faces.embedder.arch)
    face_embedder = FaceEmbedder(detector, embedder, batch=batch, device=device)
    d = faces.detector
    key = models_key([Path(detector.model_file)], Path(faces.embedder.path),
                     {"det_thresh": d.det_thresh, "nms_thresh": d.nms_thresh, "input_size": d.input_size,
                      "arch": faces.embedder.arch, "crop_fill": CROP_FILL})  # embeddings see the border
    return face_embedder, key


def prepare(settings: PrepareConfig, *, faces: FacesConfig, generator: GeneratorConfig, seed: int,
            device: str = "cpu") -> PrepareResult | None:
    """Run the stage; see the module docstring. faces: the detector and the reward's embedder (the references'
    embeddings are the reward's); generator: draws the synthetic part (prepare.synthetic); seed: the split,
    the synthetic picks and the contact sheet.

    Several processes (`accelerate launch`, `torchrun`): each indexes its share of the files (every world-th, in
    the collection's order) into the face index and the frame cache, then, after a barrier, the main process
    runs the whole stage from those caches, the one deterministic merge, and returns; the others return None."""
    p = settings
    t0 = time.perf_counter()
    raw, out = Path(p.raw), Path(p.out)
    truth = read_truth(Path(p.truth)) if p.truth else None
    if p.truth and not truth:
        raise ValueError(f"{p.truth}: ground-truth file is empty")
    embedder, key = _load_models(faces, p.index_batch, device)
    state = _processes()
    if state is not None:
        _, _, counts = index_collection(raw, extensions=p.extensions, max_pixels=p.max_image_pixels,
                                        min_side=p.min_image_side, cache=FaceCache(Path(p.face_cache), key),
                                        embedder=embedder, max_caption_chars=p.max_caption_chars, video=p.video,
                                        shard=(state.process_index, state.num_processes))
        log.info("face index, process %d of %d: %d images computed, %d cached", state.process_index,
                 state.num_processes, counts["computed"], counts["cached"])
        state.wait_for_everyone()
        if not state.is_main_process:
            return None
    scan, index, index_counts = index_collection(raw, extensions=p.extensions, max_pixels=p.max_image_pixels,
                                                 min_side=p.min_image_side, cache=FaceCache(Path(p.face_cache), key),
                                                 embedder=embedder, max_caption_chars=p.max_caption_chars,
                                                 video=p.video)
    t_index = time.perf_counter() - t0
    ids = sample_ids(scan.images)  # before anything is written: a collision names both files

    # identities and real samples, per group
    groups = build_groups(scan.images, index, settings=p)
    rejects: Counter = Counter()
    for g in groups:
        g.samples = compose_group(g.faces, g.labels, max_identities=p.max_identities, min_face_size=p.min_face_size,
                                  min_det_score=p.min_det_score, near_duplicate_threshold=p.near_duplicate_threshold,
                                  stats=rejects, clips=[image.clip for image in g.images])
    with_samples = [g.name for g in groups if g.samples]
    if not with_samples:
        raise ValueError(f"raw collection {raw}: no image makes a sample ({len(scan.images)} usable images, "
                         f"rejected: {dict(rejects) or 'none'}; skipped: {dict(scan.skipped) or 'none'})")
    train_names, test_names = split_groups(with_samples, p.test_fraction, seed)
    by_name = {g.name: g for g in groups}

    # a person seen in both splits: drop the test samples that show them
    train_ids = [i for n in train_names for i in by_name[n].identities.values()]
    train_means = np.array([i.mean for i in train_ids]) if train_ids else np.zeros((0, 1))
    linked_identities = 0
    for name in test_names:
        g = by_name[name]
        labels = list(g.identities)
        means = np.array([g.identities[lab].mean for lab in labels])
        linked = {lab for lab, hit in zip(labels, linked_to(means, train_means, p.link_threshold)) if hit}
        linked_identities += len(linked)
        kept = [s for s in g.samples if not linked & set(s.identities)]
        rejects["test_identity_in_train"] += len(g.samples) - len(kept)
        g.samples = kept

    # synthetic part (train only): needs the reference crops, so it runs while the files are written
    with atomic_dir(out / SAMPLES_DIR) as tmp:
        writer = _Writer(tmp, raw, p, generator, seed, embedder, ids)
        manifests_data: dict[str, tuple[list[Sample], dict[str, torch.Tensor]]] = {}
        for split, names in (("train", train_names), ("test", test_names)):
            samples, embeddings = [], {}
            for name in names:
                for s, e in writer.real(by_name[name]):
                    samples.append(s)
                    embeddings[s.id] = e
            manifests_data[split] = (samples, embeddings)
        synthetic_stats: Counter = Counter()
        if p.synthetic.count > 0:
            samples, embeddings = manifests_data["train"]
            for s, e in writer.synthetic(train_ids, by_name, synthetic_stats):
                samples.append(s)
                embeddings[s.id] = e
        toy = is_toy_world(raw)
        embedder_ref = {"path": str(faces.embedder.path), "sha256": sha256_file(faces.embedder.path)}
        manifests = {}
        for split, (samples, embeddings) in manifests_data.items():
            manifest = Manifest(split, samples, embeddings=f"{split}_embeddings.safetensors", embedder=embedder_ref,
                                toy_world=toy, root=tmp)
            write_manifest(manifest, tmp / f"{split}.json", embeddings)
            manifests[split] = out / SAMPLES_DIR / f"{split}.json"

    stats = {
        "images": {"usable": len(scan.images), "faces": int(sum(len(index[i.sha256]) for i in scan.images)),
                   "index_computed": index_counts["computed"], "index_cached": index_counts["cached"]},
        "groups": {"total": len(groups), "with_samples": len(with_samples), "train": len(train_names),
                   "test": len(test_names)},
        "identities": {"clusters": sum(len(g.identities) for g in groups), "test_linked_to_train": linked_identities},
        "samples": {split: _by_people(s) for split, (s, _) in manifests_data.items()},
        "rejects": {"files": dict(sorted(scan.skipped.items())), "files_listed": f"{SKIPPED_FILE} "
                    f"({len(scan.skipped_files)} of {sum(scan.skipped.values())})", "samples": dict(sorted(rejects.items())),
                    "synthetic": dict(sorted((k, v) for k, v in synthetic_stats.items() if k not in ("attempted", "kept")))},
        "converted": dict(sorted(scan.converted.items())),
        "video": dict(sorted(scan.video.items())),
        "synthetic": {"attempted": synthetic_stats["attempted"], "kept": synthetic_stats["kept"],
                      "min_similarity": p.synthetic.min_similarity},
        "seconds": {"face_index": round(t_index, 2), "total": round(time.perf_counter() - t0, 2)},
    }
    if truth is not None:
        ids = truth_ids(groups, truth)
        stats["identities"]["quality"] = cluster_quality(groups, ids)
        stats["identities"]["quality"]["split_leaks"] = _truth_leaks(groups, ids, manifests_data)
    atomic_write_json(out / STATS_FILE, stats)
    atomic_write_bytes(out / SKIPPED_FILE, "".join(json.dumps({"reason": r, "file": w}) + "\n"
                                                   for r, w in scan.skipped_files).encode())
    if p.contact_sheet:
        atomic_write_bytes(out / SHEET_FILE, _png(contact_sheet(out / SAMPLES_DIR, manifests_data, p.contact_sheet,
                                                                 seed=seed)))
    log.info("prepared %s: train %s, test %s; rejected %s", out, stats["samples"]["train"], stats["samples"]["test"],
             dict(rejects) or "none")
    return PrepareResult(out, manifests, stats)


def _by_people(samples: list[Sample]) -> dict[str, int]:
    counts = Counter(len(s.references) for s in samples)
    return {"total": len(samples), **{f"{n}_people": counts[n] for n in sorted(counts)},
            "synthetic": sum(s.source == "synthetic" for s in samples)}


def _truth_leaks(groups: list[Group], ids: dict[str, list[list | None]], manifests_data) -> int:
    """People (by ground truth: each cluster's majority true identity) who appear in samples of both splits:
    what linking missed."""
    names: dict[str, Any] = {}
    for g in groups:
        for identity in g.identities.values():
            votes = Counter(ids[g.name][k.image][k.face] for k in identity.faces if ids[g.name][k.image] is not None)
            votes.pop(None, None)
            if votes:
                names[identity.name] = votes.most_common(1)[0][0]
    return split_leaks(manifests_data["train"][0], manifests_data["test"][0], names)


class _Writer:
    """Writes targets and reference crops into the samples folder; returns manifest samples + embeddings."""

    def __init__(self, root: Path, raw: Path, settings: PrepareConfig, generator: GeneratorConfig, seed: int,
                 embedder: FaceEmbedder, ids: dict[str, str]) -> None:
        self.root, self.raw, self.embedder, self.ids = root, raw, embedder, ids
        self.p, self.generator, self.seed = settings, generator, seed
        self.images = _Images(raw, self.p.max_image_pixels)
        (root / "targets").mkdir()
        (root / "references").mkdir()
        self.written: set[str] = set()

    def reference(self, g: Group, key: FaceKey) -> str:
        image = g.images[key.image]
        rel = f"references/{self.ids[image.path]}-f{key.face}.png"
        if rel not in self.written:
            crop = _reference_crop(self.images(image), g.faces[key.image].boxes[key.face], self.p)
            atomic_write_bytes(self.root / rel, _png(crop))
            self.written.add(rel)
        return rel

    def real(self, g: Group):
        for c in g.samples:
            image = g.images[c.target]
            sid = self.ids[image.path]
            target = f"targets/{sid}.png"
            atomic_write_bytes(self.root / target, _png(self.images(image)))
            refs = tuple(Reference(g.identities[ident].name, self.reference(g, key))
                         for ident, key in zip(c.identities, c.references))
            prompt = image.caption or people_prompt(self.p.prompt_template, len(refs))
            emb = np.stack([g.faces[k.image].embeddings[k.face] for k in c.references])
            yield (Sample(sid, g.name, prompt, target, refs, "real"),
                   torch.from_numpy(emb.astype(np.float32)))

    def synthetic(self, identities: list[Identity], by_name: dict[str, Group], stats: Counter):
        """Synthetic samples from train identities (see umo.data.synthetic)."""
        s = self.p.synthetic
        candidates = []  # (identity, its best reference face: the largest usable one)
        for ident in identities:
            g = by_name[ident.group]
            sizes = np.array([g.faces[k.image].sizes()[k.face] for k in ident.faces])
            scores = np.array([g.faces[k.image].scores[k.face] for k in ident.faces])
            good = np.flatnonzero(usable(sizes, scores, min_face_size=self.p.min_face_size,
                                         min_det_score=self.p.min_det_score))
            if good.size:  # the largest usable face (ties: the first)
                candidates.append((ident, ident.faces[int(good[np.argmax(sizes[good])])]))
        if not candidates:
            stats["no_candidates"] += 1
            return
        means = np.array([c[0].mean for c in candidates])
        picks = pick_identities(means, s.count, s.identities, link_threshold=self.p.link_threshold,
                                seed=self.seed)
        stats["too_few_unlinked_people"] += s.count - len(picks)
        gen_path = Path(self.generator.path)
        if not gen_path.is_dir():
            raise FileNotFoundError(f"generator {gen_path}: no such folder (the synthetic part needs the generator: "
                                    "point generator.path at a diffusers folder, or set prepare.synthetic.count=0)")
        generator = load_generator(self.generator)
        res = self.generator.reference_resolution
        refs_rel: dict[int, list[str]] = {}

        def ref_paths(pick) -> list[str]:
            if pick.attempt not in refs_rel:
                refs_rel[pick.attempt] = [self.reference(by_name[candidates[c][0].group], candidates[c][1])
                                          for c in pick.identities]
            return refs_rel[pick.attempt]

        def render(pick) -> np.ndarray:
            prompt = people_prompt(self.p.prompt_template, len(pick.identities))
            images = [load_image(self.root / rel, res) for rel in ref_paths(pick)]
            return generate(generator, prompt, images, size=self.generator.resolution, steps=s.steps,
                            seed=self.seed * 100_003 + pick.attempt)

        def embed(rgb: np.ndarray) -> np.ndarray:  # the usable faces, as for real targets
            (det, emb), = self.embedder([rgb])
            return emb[usable(face_sizes(det.boxes), det.scores, min_face_size=self.p.min_face_size,
                              min_det_score=self.p.min_det_score)]

        def reference_embeddings(pick) -> np.ndarray:
            return np.stack([self._embedding(by_name, candidates[c]) for c in pick.identities])

        for pick, image, _ in synthesize(picks, render=render, embed=embed, references=reference_embeddings,
                                         tau=s.min_similarity, stats=stats):
            sid = f"{SYNTHETIC_GROUP}-{pick.attempt:05d}"
            target = f"targets/{sid}.png"
            atomic_write_bytes(self.root / target, _png(image))
            refs = tuple(Reference(candidates[c][0].name, rel) for c, rel in zip(pick.identities, ref_paths(pick)))
            prompt = people_prompt(self.p.prompt_template, len(refs))
            yield (Sample(sid, SYNTHETIC_GROUP, prompt, target, refs, "synthetic"),
                   torch.from_numpy(reference_embeddings(pick).astype(np.float32)))

    @staticmethod
    def _embedding(by_name: dict[str, Group], candidate) -> np.ndarray:
        ident, key = candidate
        return by_name[ident.group].faces[key.image].embeddings[key.face]


def contact_sheet(root: Path, manifests_data, n: int, *, seed: int, height: int = 128) -> np.ndarray:
    """n random samples (seeded), one row each: the references, a gap, then the target; all `height` px high."""
    samples = [s for split in ("train", "test") for s in manifests_data[split][0]]
    if not samples:
        return np.full((height, height, 3), 255, np.uint8)
    rng = np.random.default_rng(seed)
    chosen = [samples[i] for i in sorted(rng.choice(len(samples), size=min(n, len(samples)), replace=False))]
    rows = []
    for s in chosen:
        tiles = [Image.open(root / r.path).convert("RGB").resize((height, height)) for r in s.references]
        target = Image.open(root / s.target).convert("RGB")
        target = target.resize((max(1, round(target.width * height / target.height)), height))
        gap = Image.new("RGB", (height // 4, height), (255, 255, 255))
        rows.append([*tiles, gap, target])
    width = max(sum(t.width for t in row) for row in rows)
    sheet = Image.new("RGB", (width, height * len(rows) + 4 * (len(rows) - 1)), (255, 255, 255))
    for r, row in enumerate(rows):
        x = 0
        for tile in row:
            sheet.paste(tile, (x, r * (height + 4)))
            x += tile.width
    return np.asarray(sheet)
