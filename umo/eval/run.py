"""`umo evaluate`: generate with the base generator and with LoRA checkpoints under identical seeds, score every
image with every judge (faces.judges; the first decides the gate), merge the shards once, write the report.

Processes. One per device (`accelerate launch`, `torchrun`; a plain `python` call is one process). Items are
sorted by id and dealt round-robin (`items[rank::world]`); each process generates and scores only its own.
Every model's images of an item are one batch of `images_per_item` (the item's prompt and references repeated),
and image k's noise comes from its own seed, derived from (eval.seed, item id, k). So an image, and its score, is
the same whatever the number of processes (bit for bit with the same threads per process: CPU kernels split their
sums by thread count), and the same noise serves the base, the candidate and the champion.

Work folder and crashes. Each finished (model, item) is written at once to `.<out>.work/`: its images (one grid
PNG, the XVerseBench output format) and its judge scores (JSON). A run that stops is re-run with the same
command and skips what is done; a change of any setting, LoRA file, item list or scoring rule
(umo.eval.score.SCORING_VERSION) empties the work folder first.
When every process is done (a barrier), the main process reads all the score files, the one merge, and builds
`out` in a temporary sibling renamed into place (umo.eval.report); the work folder is then removed.

Scoring (umo.eval.score): each reference image's largest judge face is its identity, and the faces of a
ground-truth target (held-out set) are embedded once per item; every image, reference and target is detected
once (judges from one config share the detector) and each face embedded once per judge. Whether an item is
generated depends on the first judge; a benchmark item with a reference the judge
finds no face in is `unscored` (counted, reason kept) and not generated, except on OmniContext, whose inputs
may be non-human characters: there faceless inputs are left out of the identities.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from PIL import Image

from umo.config import EvalConfig, FacesConfig, GeneratorConfig, to_dict
from umo.eval.report import write_report
from umo.eval.score import SCORING_VERSION, ItemScore, Judge, judges_from_config, score_item
from umo.eval.sets import EvalItem, file_stem, load_heldout, load_omnicontext, load_xverse
from umo.images import decode_rgb, load_image, to_grid
from umo.io import atomic_write_bytes, atomic_write_json, sha256_file
from umo.models import generate_images, load_generator
from umo.models.lora import attach_lora_file, lora_file

log = logging.getLogger(__name__)

BASE = "base"


@dataclass
class EvalResult:
    out: Path
    metrics: dict[str, Any]


def load_items(settings: EvalConfig, out: Path, left_out: Counter | None = None) -> list[EvalItem]:
    """The configured benchmark's items, sorted by id, cut to eval.max_items (OmniContext's embedded images are
    extracted beside the report folder `out`). left_out: counts the benchmark's items that are not evaluated, by
    reason (XVerseBench: no human reference; OmniContext: not a character task; beyond eval.max_items)."""
    cfg = settings
    left_out = Counter() if left_out is None else left_out
    if cfg.benchmark == "heldout":
        items = load_heldout(cfg.path)
    elif cfg.benchmark == "xverse":
        items = load_xverse(cfg.path, cfg.root, left_out=left_out)
    else:
        items = load_omnicontext(cfg.path, out.with_name(f".{out.name}.inputs"), left_out=left_out)
    items = sorted(items, key=lambda i: i.id)
    if cfg.max_items and len(items) > cfg.max_items:
        left_out["beyond_max_items"] += len(items) - cfg.max_items
        items = items[:cfg.max_items]
    if left_out:
        log.warning("%s: %d benchmark items not evaluated: %s", cfg.path, sum(left_out.values()), dict(left_out))
    return items


def image_seeds(seed: int, item_id: str, n: int) -> list[int]:
    """The seeds of an item's n images: independent of the model, the process and the other items.

    >>> image_seeds(0, "a", 2) == image_seeds(0, "a", 3)[:2] != image_seeds(0, "b", 2)
    True
    """
    key = int.from_bytes(hashlib.sha256(item_id.encode()).digest()[:8], "little")
    return [int(np.random.SeedSequence([seed, key, k]).generate_state(1)[0]) for k in range(n)]


def fingerprint(settings: EvalConfig, generator: GeneratorConfig, faces: FacesConfig, items: list[EvalItem],
                models: dict[str, Path | None]) -> dict[str, Any]:
    """Everything a finished (model, item) result depends on; a work folder made under another is discarded."""
    cfg = {"eval": to_dict(settings), "generator": to_dict(generator), "faces": to_dict(faces)}
    listing = hashlib.sha256(json.dumps([[i.id, i.prompt, [str(p) for p in i.references], list(i.identities),
                                          str(i.target)] for i in items]).encode()).hexdigest()
    return {"eval": {k: cfg["eval"][k] for k in ("benchmark", "images_per_item", "steps", "seed", "precision")},
            "generator": cfg["generator"], "judges": cfg["faces"]["judges"], "detector": cfg["faces"]["detector"],
            "items": listing, "scoring": SCORING_VERSION,
            "models": {name: None if path is None else sha256_file(path) for name, path in models.items()}}


def evaluate(settings: EvalConfig, *, generator: GeneratorConfig, faces: FacesConfig, lora: str | Path,
             champion: str | Path | None = None, judges: dict[str, Judge] | None = None,
             out: str | Path | None = None) -> EvalResult:
    """Evaluate the base generator, the candidate LoRA (`lora`: a file or a folder holding one) and optionally the
    current champion's LoRA on the `settings` benchmark, scored by every judge of `faces` (or `judges`, by name,
    the gate's first); returns the merged metrics (on every process)."""
    cfg = settings
    out = Path(out or cfg.out)
    state = PartialState(cpu=not torch.cuda.is_available())  # cpu=True: gloo across CPU processes
    models: dict[str, Path | None] = {BASE: None, "candidate": lora_file(lora)}
    if champion is not None:
        models["champion"] = lora_file(champion)
    left_out: Counter = Counter()
    items = load_items(settings, out, left_out)
    if not items:
        raise ValueError(f"{cfg.path}: the {cfg.benchmark} set has no items to evaluate (left out: "
                         f"{dict(left_out) or 'none'})")
    work = out.with_name(f".{out.name}.work")
    score_models(settings, generator, faces, items, models, work, judges=judges, state=state)

    if state.is_main_process:
        write_report(out, settings, faces, items, read_scores(work, items, models), images=work / "images", models=models,
                     left_out=dict(left_out))
        shutil.rmtree(work, ignore_errors=True)
    state.wait_for_everyone()
    return EvalResult(out, json.loads((out / "metrics.json").read_text()))


def score_models(settings: EvalConfig, generator: GeneratorConfig, faces: FacesConfig, items: list[EvalItem],
                 models: dict[str, Path | None], work: Path, *, judges: dict[str, Judge] | None = None,
                 state=None) -> None:
    """Generate and judge every (model, item) not yet in `work` (None = the base; else a LoRA file), this
    process's share of the items, with every judge (default: faces.judges); returns after every process is done
    (see the module docstring)."""
    state = state or PartialState(cpu=not torch.cuda.is_available())
    stamp = fingerprint(settings, generator, faces, items, models)
    if state.is_main_process:
        _prepare_work(work, stamp)
    state.wait_for_everyone()
    mine = items[state.process_index::state.num_processes]
    todo = [(i, [m for m in models if not _done(work, m, i)]) for i in mine]
    todo = [(i, ms) for i, ms in todo if ms]
    log.info("evaluate %s: %d items x %d models, process %d/%d has %d to do (%d already done)",
             settings.benchmark, len(items), len(models), state.process_index, state.num_processes, len(todo),
             len(mine) - len(todo))
    if todo:
        _run(settings, generator, todo, models, work, judges or judges_from_config(faces), state.device)
    state.wait_for_everyone()


def read_scores(work: Path, items: list[EvalItem], models: dict[str, Path | None]
                ) -> dict[str, dict[str, list[ItemScore]]]:
    """Per judge (in faces.judges' order: the first decides the gate), every model's item scores, from a finished
    work folder (the one merge); a missing one is an error."""
    stored = {m: [_read_score(work, m, i) for i in items] for m in models}
    names = next(iter(next(iter(stored.values())))) if items else []
    return {j: {m: [s[j] for s in scores] for m, scores in stored.items()} for j in names}


def _prepare_work(work: Path, stamp: dict) -> None:
    path = work / "fingerprint.json"
    if work.exists() and (not path.is_file() or json.loads(path.read_text()) != stamp):
        log.warning("%s: made with other settings, models or items: starting over", work)
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, stamp)


def _score_path(work: Path, model: str, item: EvalItem) -> Path:
    return work / "scores" / model / f"{file_stem(item.id)}.json"


def _done(work: Path, model: str, item: EvalItem) -> bool:
    return _score_path(work, model, item).is_file()


def _read_score(work: Path, model: str, item: EvalItem) -> dict[str, ItemScore]:
    path = _score_path(work, model, item)
    if not path.is_file():  # a process died without raising; never report a partial merge
        raise RuntimeError(f"{path}: missing: a process did not finish item {item.id!r} for {model}")
    return {e["judge"]: ItemScore.from_dict(e["score"]) for e in json.loads(path.read_text())["judges"]}


def _run(settings: EvalConfig, generator: GeneratorConfig, todo: list[tuple[EvalItem, list[str]]],
         models: dict[str, Path | None], work: Path, judges: dict[str, Judge], device: torch.device) -> None:
    cfg, gen = settings, generator
    dtype = torch.bfloat16 if device.type == "cuda" and cfg.precision == "bf16" else torch.float32
    model = load_generator(gen, dtype=dtype, device=device)
    for name, path in models.items():
        if path is not None:
            attach_lora_file(model.transformer, path, name)
    model.transformer.eval()
    for name in models:
        (work / "images" / name).mkdir(parents=True, exist_ok=True)
        (work / "scores" / name).mkdir(parents=True, exist_ok=True)
    height, width = gen.resolution
    gate = next(iter(judges))  # the first judge: whether an item is generated at all depends on it
    start, total = time.monotonic(), sum(len(ms) for _, ms in todo)
    done = 0
    for item, names in todo:
        refs = _reference_faces(judges, item, drop_faceless=cfg.benchmark == "omnicontext")
        seeds = image_seeds(cfg.seed, item.id, cfg.images_per_item)
        if refs[gate][2] is None:
            conditioning = [load_image(p, gen.reference_resolution) for p in item.references]
            targets = _target_faces(judges, item)
        for name in names:
            scores = {j: ItemScore(item.id, len(item.identities), unscored=refs[j][2]) for j in judges}
            if refs[gate][2] is None:
                _use(model.transformer, name)
                images = generate_images(model, item.prompt, conditioning, seeds=seeds, steps=cfg.steps,
                                         height=height, width=width)
                found = _faces(judges, images)
                for j, (emb, people, reason) in refs.items():
                    if reason is None:
                        scores[j] = score_item(item.id, emb, [e for _, e in found[j]], target=targets[j],
                                               boxes=[b for b, _ in found[j]])
                        scores[j].people = people
                    scores[j].seeds = seeds
                _write_grid(work / "images" / name / f"{file_stem(item.id)}.png", images)
            # a list: the judges' order (the first decides the gate) survives the sorted keys of the file
            atomic_write_json(_score_path(work, name, item),
                              {"judges": [{"judge": j, "score": asdict(s)} for j, s in scores.items()]})
            done += 1
            rate = (time.monotonic() - start) / done
            log.info("%s %s: %d/%d done, about %.0f s left", name, item.id, done, total, rate * (total - done))


def _detections(judges: dict[str, Judge], images: list[np.ndarray]) -> dict[str, list]:
    """Each judge's detections of `images`, detected once per detector (judges from one config share it)."""
    by_detector: dict[int, list] = {}
    for judge in judges.values():
        if id(judge.detector) not in by_detector:
            by_detector[id(judge.detector)] = judge.detect(images)
    return {j: by_detector[id(judge.detector)] for j, judge in judges.items()}


def _faces(judges: dict[str, Judge], images: list[np.ndarray]) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Per judge, per image (boxes, embeddings) of every alignable face: each face embedded once per judge."""
    dets = _detections(judges, images)
    return {j: judge.faces(images, dets[j]) for j, judge in judges.items()}


def _target_faces(judges: dict[str, Judge], item: EvalItem) -> dict[str, np.ndarray | None]:
    """Per judge, the ground-truth target's face embeddings (None without a target), embedded once per item."""
    if item.target is None:
        return dict.fromkeys(judges)
    image = decode_rgb(item.target, max_pixels=None)[0]
    dets = _detections(judges, [image])
    return {j: judge.target(image, dets[j]) for j, judge in judges.items()}


def _use(transformer: torch.nn.Module, name: str) -> None:
    if not getattr(transformer, "_hf_peft_config_loaded", False):
        return
    if name == BASE:
        transformer.disable_adapters()
    else:
        transformer.enable_adapters()
        transformer.set_adapter(name)


def _reference_faces(judges: dict[str, Judge], item: EvalItem, *,
                     drop_faceless: bool) -> dict[str, tuple[np.ndarray, list[int], str | None]]:
    """Per judge: the identities' embeddings (M, D), which references they are (indices into item.references),
    and why the item cannot be scored by that judge (None when it can). References are detected once."""
    people = [decode_rgb(item.references[k], max_pixels=None)[0] for k in item.identities]
    dets = _detections(judges, people)
    out = {}
    for j, judge in judges.items():
        emb, missing = judge.references(people, dets[j])
        if missing and not drop_faceless:
            names = ", ".join(item.references[item.identities[r]].name for r in missing)
            out[j] = (emb, list(item.identities), f"no face found in reference {names}")
            continue
        keep = [r for r in range(len(people)) if r not in missing]
        out[j] = ((emb[keep], [item.identities[r] for r in keep], None) if keep
                  else (emb[:0], [], "no face found in any input image"))
    return out


def _write_grid(path: Path, images: list[np.ndarray]) -> None:
    buf = io.BytesIO()
    Image.fromarray(to_grid(images)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())

