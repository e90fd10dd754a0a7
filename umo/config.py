"""The settings: one section per stage, loaded from params.yaml, validated on load.

params.yaml is the single source of settings (DVC tracks it as `params`). Every key must be known: a typo
such as `reward.kindd` is an error naming the file and the key, never a silently ignored setting. CLI
overrides use dotted keys (`-S reward.kind=sir`), parsed as YAML scalars, and go through the same checks.

Installed extensions add sections of their own through the `umo.extensions` entry point (the toy world adds
`toyworld`, `toybase` and `ablation`); the product's schema below never names them. The typed loader itself is
`umo.typed`.
"""

from __future__ import annotations

import functools
import importlib.metadata
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import yaml
from ruamel.yaml import YAML

from umo.io import atomic_write_bytes
from umo.typed import ConfigError, apply_override, from_dict, json_schema
from umo.typed import to_dict as _plain

__all__ = ["Config", "ConfigError", "apply_override", "config_from_dict", "extensions", "load_config",
           "params_schema", "to_dict", "write_overrides"]


# ---------------------------------------------------------------------------------------------------- schema


@dataclass
class DetectorConfig:
    """Face detector: an insightface model pack (SCRFD/RetinaFace ONNX with 5 landmarks)."""

    root: str = "artifacts/toyworld/models/faces"
    """Model root folder; never downloaded from anywhere."""
    pack: str | None = "toy_detector"
    """Sub-folder of `root` holding the pack (e.g. buffalo_l); null = the ONNX files are in `root`."""
    det_thresh: float = 0.5
    """Minimum detection score, in [0, 1]."""
    nms_thresh: float = 0.4
    """IoU above which a lower-scored box is suppressed, in [0, 1]."""
    input_size: list[int] | None = None
    """Detector input [width, height]; null = the image size rounded up to a multiple of 32."""

    def __post_init__(self) -> None:
        _check_unit("det_thresh", self.det_thresh)
        _check_unit("nms_thresh", self.nms_thresh)
        if self.input_size is not None and (
            len(self.input_size) != 2 or min(self.input_size) <= 0 or any(s % 32 for s in self.input_size)
        ):
            raise ConfigError(f"input_size: expected [width, height], positive multiples of 32, got {self.input_size}")


@dataclass
class EmbedderConfig:
    """Reward embedder: ArcFace IResNet (arcface_torch state dict, .pth or .safetensors)."""

    path: str = "artifacts/toyworld/models/faces/arcface_toy_r18.safetensors"
    arch: Literal["r18", "r34", "r50", "r100", "toy_r10", "toy_r18"] = "toy_r18"
    """IResNet depth of the checkpoint (toy_* are the toy world's small variants)."""


@dataclass
class JudgeConfig:
    """An evaluation judge: an insightface ONNX recognizer, a different model from the reward embedder."""

    root: str = "artifacts/toyworld/models/faces"
    pack: str | None = "toy_judge"
    name: str | None = None
    """How reports and MLflow name this judge; null = the pack's folder name (or the root's)."""

    @property
    def label(self) -> str:
        return self.name or self.pack or Path(self.root).name


@dataclass
class FacesConfig:
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    judges: list[JudgeConfig] = field(default_factory=lambda: [
        JudgeConfig(name="toy_r10"), JudgeConfig(pack="toy_judge_mbf", name="toy_mbf")])
    """The evaluation judges, each reported; the FIRST decides the approval gate. All share the detector."""
    min_face_size: float = 0.0
    """Faces whose shorter box side is below this many pixels are ignored (0 = keep all)."""
    providers: Literal["auto"] | list[str] = "auto"
    """onnxruntime execution providers of the ONNX face models (detector, judges): auto = CUDA then the CPU where
    onnxruntime has CUDA (the onnxruntime-gpu package), else the CPU; or a list such as [CPUExecutionProvider]. One
    that onnxruntime lacks is left out with a log line; the CPU is added last when the list lacks it."""

    def __post_init__(self) -> None:
        if self.min_face_size < 0:
            raise ConfigError(f"min_face_size: expected >= 0, got {self.min_face_size}")
        if not isinstance(self.providers, str) and (
                not self.providers or not all(p.endswith("ExecutionProvider") for p in self.providers)):
            raise ConfigError(f"providers: expected auto or a list of onnxruntime execution providers such as "
                              f"[CUDAExecutionProvider, CPUExecutionProvider], got {self.providers}")
        if not self.judges:
            raise ConfigError("judges: expected at least one judge (the first decides the gate)")
        labels = [j.label for j in self.judges]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"judges: two judges are named alike ({labels}); give each a `name`")

    @property
    def judge(self) -> JudgeConfig:
        """The gate's judge: the first of `judges`."""
        return self.judges[0]


@dataclass
class RewardConfig:
    """The identity reward of ReReFL (docs/method.md, Rewards)."""

    kind: Literal["mimr", "sir"] = "mimr"
    """mimr: multi-identity matching reward; sir: per-identity best similarity (the ablation baseline)."""
    matched_weight: float = 1.0
    """MIMR weight of Hungarian-assigned (reference, face) pairs."""
    unmatched_weight: float = -1.0
    """MIMR weight of every other pair."""
    reference_source: Literal["cached", "target_faces"] = "cached"
    """cached: reference embeddings from data prep; target_faces: faces of the target image (public code)."""
    max_faces: int = 8
    """At most this many generated faces per image are scored (highest detection scores first)."""

    def __post_init__(self) -> None:
        if self.max_faces < 1:
            raise ConfigError(f"max_faces: expected >= 1, got {self.max_faces}")


@dataclass
class GeneratorConfig:
    """The multi-reference generator the LoRA is trained on (a local diffusers folder; never downloaded)."""

    family: Literal["auto", "flux2_klein", "flux2_dev", "qwen_image_edit"] = "flux2_klein"
    """The model family (umo.models.FAMILIES); the folder's model_index.json must name one of its pipelines.
    auto: whatever family the folder holds."""
    path: str = "artifacts/toybase/generator"
    """Local diffusers pipeline folder (the embedded default writes a tiny one here)."""
    text_layers: list[int] | None = None
    """Text-encoder hidden states stacked as the prompt embedding; null = the tiny model's or [9, 18, 27]."""
    max_sequence_length: int = 4
    guidance_scale: float = 1.0
    """Guidance when > 1: classifier-free for klein (base: 4; distilled: 1) and Qwen-Image-Edit (its true CFG:
    4); FLUX.2 [dev] is guidance-distilled and takes the value as its embedded guidance (4)."""
    resolution: list[int] = field(default_factory=lambda: [80, 128])
    """Generated [height, width] in pixels, multiples of 16."""
    reference_resolution: list[int] = field(default_factory=lambda: [32, 32])
    """[height, width] every reference image is resized to before encoding, multiples of 16."""
    reference_cache: bool = True
    """KV variant folders (Flux2KleinKVPipeline): compute the reference tokens' keys/values once per batch and
    reuse them in the no-grad sampler steps (exact); ignored for plain klein, which cannot cache exactly."""

    def __post_init__(self) -> None:
        for name in ("resolution", "reference_resolution"):
            value = getattr(self, name)
            if len(value) != 2 or min(value) <= 0 or any(v % 16 for v in value):
                raise ConfigError(f"{name}: expected [height, width], positive multiples of 16, got {value}")
        if self.guidance_scale < 1.0:
            raise ConfigError(f"guidance_scale: expected >= 1 (1 = no guidance), got {self.guidance_scale}")


@dataclass
class LoraConfig:
    """The trained LoRA (peft), saved in the diffusers LoRA format."""

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: [
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
        "attn.to_qkv_mlp_proj", "attn.to_out"])
    """Linear layers matched by dotted-name suffix (FLUX.2: double-block attention q/k/v/out of both streams,
    single-block fused qkv+mlp input and output)."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"rank: expected >= 1, got {self.rank}")
        if not self.target_modules:
            raise ConfigError("target_modules: expected at least one module name")


@dataclass
class TrainConfig:
    """ReReFL (docs/method.md). Defaults suit the embedded default's tiny generator; the paper's
    values are in the comments of params.yaml."""

    sampler_steps: int = 8
    """T: steps of the sampler the gradient step is drawn from (paper: 25 for UNO, 50 for OmniGen2)."""
    grad_step_range: list[int] = field(default_factory=lambda: [1, 4])
    """[T_s, T_e]: the gradient step, counted as remaining steps (paper: [1, 10] / [1, 20])."""
    diff_weight: float = 1.0
    """lambda: weight of the supervised flow-matching loss L_diff (paper: 1)."""
    reward_weight: float = 1.0
    """w: weight of the reward term (paper: 1). 0 = supervised flow matching alone (the ablation's SFT arm); the
    reward is still measured and logged, without gradient."""
    anchor_weight: float = 0.0
    """beta: weight of the anchor, MSE between the LoRA model's velocity and the frozen base's at the gradient
    step (the "KL to the pretrained model" of RL peers; a guard against reward hacking). 0 = off."""
    learning_rate: float = 1e-3
    """AdamW on the LoRA (paper: 5e-6 at rank 512)."""
    weight_decay: float = 0.0
    gradient_checkpointing: bool = False
    """Recompute the transformer blocks in backward (non-reentrant, so DDP sees each parameter once)."""
    mixed_precision: Literal["no", "bf16"] = "bf16"
    """bf16: frozen weights in bf16 and autocast, LoRA and optimizer in fp32 (GPU only; CPU runs fp32)."""
    max_steps: int = 200
    """Optimizer steps in all."""
    batch_size: int = 2
    """Samples per process per micro-batch (samples of a batch share their number of references)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step; the total batch is batch_size x processes x this (paper: 8)."""
    max_grad_norm: float = 1.0
    """Clip the LoRA gradient to this global L2 norm (0 = no clipping; the norm is logged either way)."""
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant_with_warmup"
    warmup_steps: int = 10
    ema_decay: float | None = None
    """Exponential moving average of the LoRA (e.g. 0.999); the final LoRA is the average when set."""
    checkpoint_every: int = 50
    """Save a resumable checkpoint every N optimizer steps (and at the end)."""
    checkpoints_total_limit: int = 3
    """Keep the newest N checkpoints; older ones are deleted after a new one is complete."""
    log_every: int = 1
    """Log scalars to MLflow every N optimizer steps."""
    sample_every: int = 50
    """Log the step's decoded x0_hat images to MLflow every N optimizer steps (0 = never): a grid of references
    and images, and the pictures of the matching (the reward's faces, assignment and similarities), with the
    step, so that the MLflow UI's slider steps through them."""
    judge_every: int = 50
    """Every N optimizer steps, the gate's judge (faces.judges' first) scores the last micro-batch's images
    too: the reward's ID-Sim and the judge's on the same draws, and their gap, go to MLflow (guard/*): a reward
    that rises while the judge does not is being gamed. 0 = never."""
    max_nonfinite_steps: int = 5
    """A non-finite loss or gradient skips the step (counted); this many in a row abort the run."""
    accelerate_config: str = "infra/accelerate/cpu.yaml"
    """The `accelerate launch --config_file` of dvc.yaml's train stage (and so of the Prefect flow): one CPU
    process by default; infra/accelerate/ holds single-GPU, 8-GPU DDP and multi-node configs."""

    def __post_init__(self) -> None:
        lo_hi = self.grad_step_range
        if len(lo_hi) != 2 or not 1 <= lo_hi[0] <= lo_hi[1] <= self.sampler_steps:
            raise ConfigError(f"grad_step_range: expected [T_s, T_e] with 1 <= T_s <= T_e <= sampler_steps "
                              f"({self.sampler_steps}), got {lo_hi}")
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "checkpoint_every",
                     "checkpoints_total_limit", "log_every", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.diff_weight < 0 or self.reward_weight < 0 or not (self.diff_weight or self.reward_weight):
            raise ConfigError(f"diff_weight, reward_weight: expected >= 0 and not both 0 (nothing would be "
                              f"trained), got {self.diff_weight}, {self.reward_weight}")
        for name in ("learning_rate", "max_grad_norm", "warmup_steps", "sample_every", "weight_decay",
                     "judge_every", "anchor_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: expected >= 0, got {getattr(self, name)}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay: expected null or a value in (0, 1), got {self.ema_decay}")


@dataclass
class VideoConfig:
    """Videos in the raw collection (umo.data.video): each video is a group, each of its shots a clip."""

    extensions: list[str] = field(default_factory=lambda: [".mp4", ".mov", ".mkv", ".webm"])
    fps: float = 2.0
    """Candidate frames per second of video (by each frame's timestamp)."""
    max_frames_per_shot: int = 4
    """At most this many frames of a shot are kept, spread over it."""
    min_sharpness: float = 20.0
    """Candidates whose variance of the Laplacian is lower are blurry: dropped (counted)."""
    cut_threshold: float = 0.5
    """A cut lies between two candidates whose HSV histograms differ by this much (L1 / 2, 0..1)."""
    seek_seconds: float = 4.0
    """The reader seeks instead of decoding when the next candidate is this far ahead."""
    frame_cache: str = "artifacts/frame_cache"
    """Kept frames as PNG files, by video content hash and these settings; safe to delete."""

    def __post_init__(self) -> None:
        if self.fps <= 0 or self.max_frames_per_shot < 1 or self.seek_seconds <= 0:
            raise ConfigError("video: fps and seek_seconds must be > 0, max_frames_per_shot >= 1")
        _check_unit("cut_threshold", self.cut_threshold)


@dataclass
class SyntheticConfig:
    """The synthetic part: multi-person images generated from single-identity references, kept only when every
    reference is assigned (Hungarian) to a generated face with similarity >= min_similarity."""

    count: int = 8
    """Images to generate (0: no synthetic part)."""
    identities: list[int] = field(default_factory=lambda: [2, 3])
    """[min, max] people per generated image."""
    min_similarity: float = 0.5
    """tau: the reward embedder's cosine between each reference and its assigned generated face."""
    steps: int = 8
    """Sampler steps of the generator."""

    def __post_init__(self) -> None:
        _check_unit("min_similarity", self.min_similarity)
        if self.count < 0 or self.steps < 1:
            raise ConfigError("synthetic.count: expected >= 0; synthetic.steps: expected >= 1")
        if len(self.identities) != 2 or not 1 <= self.identities[0] <= self.identities[1]:
            raise ConfigError(f"synthetic.identities: expected [min, max] with 1 <= min <= max, "
                              f"got {self.identities}")


@dataclass
class PrepareConfig:
    """Data prep: raw collection -> face index -> identities -> samples -> manifests."""

    raw: str = "data"
    """The raw collection: one folder per group (album, event) of images, captions optional; each video in it
    is a group of its own."""
    out: str = "artifacts/prepared"
    extensions: list[str] = field(default_factory=lambda: [".jpg", ".jpeg", ".png", ".webp"])
    max_image_pixels: int = 40_000_000
    """Images with more pixels are skipped as possible decompression bombs (counted)."""
    max_caption_chars: int = 2000
    """Longer captions are cut to this many characters (counted: caption_truncated); a 100 MB caption would
    otherwise go whole through the tokenizer in every training step."""
    min_image_side: int = 32
    cluster_threshold: float = 0.12
    """Faces of a group join one identity while their clusters' mean cosine similarity is >= this."""
    max_identities: int = 4
    """N: targets show 1..N identities (more faces: the image is skipped, counted)."""
    min_face_size: float = 24.0
    """Faces smaller than this (px, box side) are not usable as target or reference faces."""
    min_det_score: float = 0.6
    near_duplicate_threshold: float = 0.95
    """A reference candidate this similar to the target face is a near-duplicate frame: rejected (counted)."""
    reference_crop: Literal["face", "upper_body"] = "face"
    crop_margin: float = 0.5
    """Extra context around the face box, as a fraction of its side (face crops)."""
    reference_size: int = 128
    """Saved reference crops are squares of this side (px)."""
    prompt_template: str = "a photo of {people}"
    """For images without a caption; {people} becomes "person 1 and person 2" etc."""
    test_fraction: float = 0.2
    """Share of groups held out for the test split (split by group, never by image)."""
    link_threshold: float = 1.0
    """Two identities of different groups are taken for one person when their faces' mean cosine similarity is
    >= this; test samples with a person also seen in the train split are dropped (counted)."""
    face_cache: str = "artifacts/face_index"
    """The face index cache (per image content hash and face models); safe to delete."""
    index_batch: int = 16
    """Images per detector/embedder batch."""
    truth: str | None = "artifacts/toyworld/toy_raw_truth.jsonl"
    """Optional ground-truth JSONL ({group, image, boxes, identity_ids} per image, like the toy world's
    toy_raw_truth.jsonl): cluster purity and completeness are then reported in stats.json."""
    contact_sheet: int = 8
    """Random samples drawn on contact_sheet.png (references beside the target)."""
    synthetic: SyntheticConfig = field(default_factory=lambda: SyntheticConfig(count=0))
    video: VideoConfig = field(default_factory=VideoConfig)

    def __post_init__(self) -> None:
        _check_unit("cluster_threshold", self.cluster_threshold)
        _check_unit("near_duplicate_threshold", self.near_duplicate_threshold)
        _check_unit("test_fraction", self.test_fraction)
        _check_unit("link_threshold", self.link_threshold)
        if self.synthetic.identities[1] > self.max_identities:
            raise ConfigError(f"synthetic.identities: at most max_identities ({self.max_identities}) people, "
                              f"got {self.synthetic.identities}")
        if self.index_batch < 1 or self.contact_sheet < 0:
            raise ConfigError("index_batch: expected >= 1; contact_sheet: expected >= 0")
        if self.max_identities < 1 or self.reference_size < 16:
            raise ConfigError("max_identities: expected >= 1; reference_size: expected >= 16")
        if "{people}" not in self.prompt_template:
            raise ConfigError(f"prompt_template: must contain {{people}}, got {self.prompt_template!r}")
        if self.max_image_pixels < 1 or self.min_image_side < 1:
            raise ConfigError("max_image_pixels and min_image_side: expected >= 1")
        bad = [e for e in self.extensions if not e.startswith(".") or e != e.lower()]
        if bad or not self.extensions:
            raise ConfigError(f"extensions: expected lower-case suffixes with a dot, got {self.extensions}")


@dataclass
class ScalingSetConfig:
    """A set of items with more and more people, evaluated by `umo evaluate --scaling` with eval's other settings
    and reported per number of people (ID-Sim, ID-Conf, face count and collapse against it; docs/evaluation.md)."""

    path: str | None = "artifacts/scaling/scaling.json"
    """An XVerseBench JSON file (the embedded default: `umo toybase scaling`, 2 to 10 people); null = none."""
    images_per_item: int = 2
    """Seeds per item and model."""
    out: str = "artifacts/reports/scaling"

    def __post_init__(self) -> None:
        if self.images_per_item < 1:
            raise ConfigError(f"images_per_item: expected >= 1, got {self.images_per_item}")


@dataclass
class EvalConfig:
    """Benchmark evaluation: base and candidate generate under the same seeds; the judge scores both."""

    benchmark: Literal["heldout", "xverse", "omnicontext"] = "heldout"
    path: str = "artifacts/prepared/samples/test.json"
    """heldout: the test manifest; xverse: the benchmark JSON file; omnicontext: the dataset folder (parquet)."""
    root: str | None = None
    """xverse: the folder its image paths are relative to (null: the JSON file's folder)."""
    images_per_item: int = 4
    """Seeds per item and model (XVerseBench: 4, saved as one 2x2 grid per item)."""
    steps: int = 8
    """Sampler steps."""
    seed: int = 0
    """Image k of item i uses a seed derived from (seed, item id, k): the same for every model and sharding."""
    max_items: int | None = None
    """Evaluate only the first N items (by id); null = all."""
    report_items: int = 3
    """The most improved and the most regressed items (candidate vs base ID-Sim) drawn as PNG grids."""
    precision: Literal["fp32", "bf16"] = "bf16"
    """Generator weights on a GPU (a CPU always runs fp32)."""
    out: str = "artifacts/reports/heldout"
    scaling: ScalingSetConfig = field(default_factory=lambda: ScalingSetConfig())
    """The scaling set (`umo evaluate --scaling`): reported by number of people, never gated."""

    def __post_init__(self) -> None:
        if self.images_per_item < 1 or self.steps < 1 or self.report_items < 0:
            raise ConfigError("images_per_item and steps: expected >= 1; report_items: expected >= 0")
        if self.max_items is not None and self.max_items < 1:
            raise ConfigError(f"max_items: expected null or >= 1, got {self.max_items}")


@dataclass
class GateConfig:
    """The approval policy: every rule must hold for a version to become `champion`.

    Metrics are on the report's scale (x100 for the held-out set and XVerseBench). A rule whose metric the report
    lacks (not measured for the candidate, or for the model it is compared with) fails: no evidence, no pass."""

    min_id_sim_gain: float = 0.0
    """delta: candidate ID-Sim >= base ID-Sim + delta."""
    max_id_conf_drop: float = 0.0
    """epsilon: candidate ID-Conf >= base ID-Conf - epsilon."""
    face_count_not_lower: bool = True
    """candidate face-count accuracy >= base's."""
    require_all_scored: bool = True
    """no unscored evaluation item (every reference had a face the judge found)."""
    min_scored_references: int = 16
    """The least evidence a decision rests on: (item, image, reference) entries the judge scored for the candidate
    and for every model it is compared with. Fewer is a refusal, and so is a model whose images the judge found no
    face in, whatever this number."""
    champion_margin: float = 0.0
    """When a champion exists: candidate ID-Sim >= champion ID-Sim + margin, both from the SAME report (same
    seeds; `umo evaluate --champion`). A report without the champion's column fails this rule."""
    max_copy_paste_rise: float | None = 0.05
    """Copy-paste (against the ground truth): candidate CP <= base CP + this, and <= the champion's + this when
    the report has its column. null: no such rule (a benchmark without ground truth measures no CP, and a rule
    on a metric not measured fails)."""
    max_collapse_rise: float | None = 0.05
    """Collapse rate (the share of images where two people's best faces are one face): candidate <= base + this,
    and <= the champion's + this when the report has its column. null: no such rule."""
    use_intervals: bool = True
    """Decide on the report's paired 95% item-bootstrap intervals of candidate - base (and - champion) instead of
    point estimates: a gain must be shown (ID-Sim, champion: the LOWER bound >= delta / margin) and a drop must not
    be (ID-Conf: the UPPER bound >= -epsilon; face count: >= 0; copy-paste and collapse: the LOWER bound of the
    rise <= its margin). A difference the evaluation cannot resolve thus neither approves (a +0.1 ID-Sim within
    noise) nor refuses (a -0.7 ID-Conf whose interval is [-3.9, +2.7]).
    false: the point estimates decide. A report without intervals fails these rules."""

    def __post_init__(self) -> None:
        if self.min_scored_references < 1:
            raise ConfigError(f"min_scored_references: expected >= 1, got {self.min_scored_references}")
        for name in ("max_copy_paste_rise", "max_collapse_rise"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(f"{name}: expected >= 0 or null, got {getattr(self, name)}")


@dataclass
class RegistryConfig:
    """MLflow model registry: what `umo register` creates and what `umo gate` decides."""

    model_name: str = "umo-flux2-klein-lora"
    gate: GateConfig = field(default_factory=GateConfig)
    approval: Literal["auto", "human"] = "auto"
    """auto: a version that passes the gate becomes `champion`; human: it waits for a person (`umo approve`, or
    the Prefect flow's approval form), and only an approved version becomes `champion`."""
    hub_base_model: str | None = None
    """The base model's Hugging Face Hub id for the model card's `base_model` (e.g.
    black-forest-labs/FLUX.2-klein-base-4B); null = none (a local or synthetic base)."""
    license: str = "other"
    """The model card's license field (a Hub license id; the base model's license binds the LoRA too)."""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", self.model_name):
            raise ConfigError(f"model_name: letters, digits, '.', '_' and '-' only (at most 128), got "
                              f"{self.model_name!r}")


@dataclass
class DeployConfig:
    """`umo deploy`: where approved checkpoints go."""

    target: str = "artifacts/deploy"
    """s3://bucket/prefix (credentials from boto3's standard chain) or a local folder with the same layout."""
    multipart_threshold_mb: float = 64.0
    """Files from this size (MiB) upload in parts."""
    multipart_chunk_mb: float = 16.0
    """Part size in MiB (S3 allows >= 5 MiB except for the last part)."""
    max_attempts: int = 5
    """Attempts per S3 request, the first included (botocore's standard retry mode: throttling, 5xx and
    connection errors are retried with jittered exponential backoff)."""

    def __post_init__(self) -> None:
        if self.multipart_threshold_mb <= 0 or self.multipart_chunk_mb < 5:
            raise ConfigError(f"multipart_threshold_mb: expected > 0; multipart_chunk_mb: expected >= 5 (S3's "
                              f"smallest part), got {self.multipart_threshold_mb}, {self.multipart_chunk_mb}")
        if not 1 <= self.max_attempts <= 20:
            raise ConfigError(f"max_attempts: expected 1 to 20 attempts per S3 request, got {self.max_attempts}")


@dataclass
class TrackingConfig:
    """MLflow tracking (the main process of a run logs; the others never touch MLflow)."""

    tracking_uri: str | None = None
    """null = $MLFLOW_TRACKING_URI, else a local SQLite store at artifacts/mlflow/mlflow.db."""
    experiment: str = "umo"
    system_metrics_seconds: float = 10.0
    """Training samples the machine (CPU, memory, GPU, disk, network: MLflow's system/* metrics) this often; 0 = off."""

    def __post_init__(self) -> None:
        if self.system_metrics_seconds < 0:
            raise ConfigError(f"system_metrics_seconds: expected >= 0 (0 = off), got {self.system_metrics_seconds}")


@dataclass
class StageTimeout:
    stage: str
    """a stage of dvc.yaml"""
    minutes: float


@dataclass
class OrchestrationConfig:
    """How the Prefect flow (flows/umo_pipeline.py) runs the stages; no stage reads it."""

    timeout_minutes: float = 120.0
    """A stage that runs longer is stopped (its process group: SIGTERM, then SIGKILL) and fails, not retried."""
    timeouts: list[StageTimeout] = field(default_factory=lambda: [StageTimeout("train", 1440.0)])
    """Per-stage timeouts that replace timeout_minutes, e.g. [{stage: train, minutes: 1440}]."""
    retries: int = 2
    """Retries of a stage that failed transiently (connection, timeout, HTTP 5xx, SIGTERM; umo.failures)."""
    retry_delay_seconds: float = 60.0
    approval_timeout_hours: float = 72.0
    """registry.approval human: how long the flow waits for a person's answer before it fails."""

    def __post_init__(self) -> None:
        minutes = [self.timeout_minutes, *(t.minutes for t in self.timeouts)]
        if min(minutes) <= 0 or self.retries < 0 or self.retry_delay_seconds < 0 or self.approval_timeout_hours <= 0:
            raise ConfigError(f"orchestration: timeouts and approval_timeout_hours must be > 0, retries and "
                              f"retry_delay_seconds >= 0 (got {self})")
        stages = [t.stage for t in self.timeouts]
        if len(set(stages)) != len(stages):
            raise ConfigError(f"orchestration.timeouts: a stage is listed twice ({stages})")

    def timeout_for(self, stage: str) -> float:
        """Seconds."""
        return 60.0 * next((t.minutes for t in self.timeouts if t.stage == stage), self.timeout_minutes)


@dataclass
class Config:
    """Everything in params.yaml."""

    seed: int = 0
    faces: FacesConfig = field(default_factory=FacesConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    orchestration: OrchestrationConfig = field(default_factory=OrchestrationConfig)
    extensions: dict[str, Any] = field(default_factory=lambda: {n: c() for n, c in extension_sections().items()})
    """Sections that installed extensions register (`extension_sections`), by name: the toy world's, for one."""

    def section(self, name: str) -> Any:
        """An extension's section (defaults filled in); KeyError naming the registered ones."""
        try:
            return self.extensions[name]
        except KeyError:
            raise KeyError(f"no config section {name!r} (registered: {sorted(self.extensions) or 'none'})") from None


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name}: expected a value in [0, 1], got {value}")


# ---------------------------------------------------------------------------------------------------- extensions

EXTENSIONS_GROUP = "umo.extensions"


@functools.cache
def extensions() -> tuple[ModuleType, ...]:
    """The installed extensions: modules named by `umo.extensions` entry points (pyproject.toml). Each has
    SECTIONS ({params.yaml section: its dataclass}) and add_commands(subparsers) for the `umo` command."""
    return tuple(ep.load() for ep in sorted(importlib.metadata.entry_points(group=EXTENSIONS_GROUP),
                                             key=lambda ep: ep.name))


def extension_sections() -> dict[str, type]:
    """{section name: dataclass} of every installed extension; a name claimed twice is an error."""
    sections: dict[str, type] = {}
    for ext in extensions():
        for name, cls in ext.SECTIONS.items():
            if name in sections or name in Config.__dataclass_fields__:
                raise ConfigError(f"extension {ext.__name__}: section {name!r} is already defined")
            sections[name] = cls
    return sections


# ---------------------------------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = "params.yaml", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read params.yaml (None = defaults only), apply dotted `key=value` overrides, validate everything."""
    source = "defaults" if path is None else str(path)
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: params file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    for item in overrides:
        apply_override(data, item)
    return config_from_dict(data, source=source)


def config_from_dict(data: dict[str, Any], *, source: str = "params") -> Config:
    """Validate params.yaml's plain data: the product's sections, then each extension's (defaults if absent)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {data!r}")
    faces = data.get("faces")
    if isinstance(faces, dict) and "judge" in faces:
        raise ConfigError(f"{source}: faces.judge is now faces.judges, a list of judges whose first decides the "
                          "gate: write `judges: [{root: ..., pack: ...}]`")
    sections = extension_sections()
    own = set(Config.__dataclass_fields__) - {"extensions"}
    unknown = sorted(set(data) - own - set(sections))
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]} (known keys of <top level>: "
                          f"{', '.join(sorted(own | set(sections)))})")
    config = from_dict(Config, {k: v for k, v in data.items() if k in own}, source=source)
    config.extensions = {name: from_dict(cls, data.get(name, {}), source=source, prefix=f"{name}.")
                         for name, cls in sections.items()}
    return config


def params_schema() -> dict[str, Any]:
    """The JSON Schema of params.yaml, extensions' sections included (`umo config --schema`; the committed
    params.schema.json, which editors read through params.yaml's first line)."""
    schema = json_schema(Config, extra=extension_sections(), drop=("extensions",))
    return schema | {"title": "umo params.yaml"}


def to_dict(config: Any) -> dict[str, Any]:
    """The plain-data form of a config (what params.yaml would hold), for logging and `umo config`."""
    if isinstance(config, Config):
        data = _plain(config)
        extension_data = data.pop("extensions")
        return data | extension_data
    return _plain(config)


def write_overrides(path: str | Path, overrides: list[str] | tuple[str, ...]) -> Config:
    """Apply dotted `key=value` overrides to the params file itself (what `dvc exp run -S` does), keeping its
    comments and layout; validated first, so a bad key or value leaves the file untouched. Atomic."""
    config = load_config(path, overrides)  # raises ConfigError naming the key before anything is written
    path = Path(path)
    rt = YAML()  # round trip: comments, order and quoting survive
    rt.preserve_quotes = True
    rt.width = 4096
    rt.indent(mapping=2, sequence=4, offset=2)  # block lists as params.yaml writes them: "    - name: ..."
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    data = rt.load(path.read_text())
    for item in overrides:
        apply_override(data, item)
    text = io.StringIO()
    rt.dump(data, text)
    atomic_write_bytes(path, text.getvalue().encode())
    return config


