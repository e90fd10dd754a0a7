"""Typed configuration: one dataclass per concern, loaded from params.yaml, validated on load.

params.yaml is the single source of settings (DVC tracks it as `params`). Every key must be known: a typo
such as `reward.kindd` is an error naming the file and the key, never a silently ignored setting. CLI
overrides use dotted keys (`-S reward.kind=sir`), parsed as YAML scalars, and go through the same checks.
"""

from __future__ import annotations

import dataclasses
import io
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A params file or override that does not match the configuration schema."""


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
    """Evaluation judge: an insightface ONNX recognizer, a different model from the reward embedder."""

    root: str = "artifacts/toyworld/models/faces"
    pack: str | None = "toy_judge"


@dataclass
class FacesConfig:
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    min_face_size: float = 0.0
    """Faces whose shorter box side is below this many pixels are ignored (0 = keep all)."""

    def __post_init__(self) -> None:
        if self.min_face_size < 0:
            raise ConfigError(f"min_face_size: expected >= 0, got {self.min_face_size}")


@dataclass
class RewardConfig:
    """The identity reward of ReReFL (PAPER.md, 'The rewards')."""

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

    family: Literal["flux2_klein"] = "flux2_klein"
    path: str = "artifacts/toybase/generator"
    """Local diffusers pipeline folder (the embedded default writes a tiny one here)."""
    text_layers: list[int] | None = None
    """Text-encoder hidden states stacked as the prompt embedding; null = the tiny model's or [9, 18, 27]."""
    max_sequence_length: int = 4
    guidance_scale: float = 1.0
    """Classifier-free guidance when > 1 (base klein: 4; distilled klein: 1)."""
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
    """ReReFL (PAPER.md, Algorithm 1). Defaults suit the embedded default's tiny generator; the paper's
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
    """Log the decoded x0_hat images of the step as a grid to MLflow every N optimizer steps (0 = never)."""
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
        for name in ("learning_rate", "max_grad_norm", "warmup_steps", "sample_every", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: expected >= 0, got {getattr(self, name)}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay: expected null or a value in (0, 1), got {self.ema_decay}")


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
    """Data prep (issue 5): raw collection -> face index -> identities -> samples -> manifests."""

    raw: str = "data"
    """The raw collection: one folder per group (video, album, event) of images, captions optional."""
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
class EvalConfig:
    """Benchmark evaluation (issue 6): base and candidate generate under the same seeds; the judge scores both."""

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

    def __post_init__(self) -> None:
        if self.images_per_item < 1 or self.steps < 1 or self.report_items < 0:
            raise ConfigError("images_per_item and steps: expected >= 1; report_items: expected >= 0")
        if self.max_items is not None and self.max_items < 1:
            raise ConfigError(f"max_items: expected null or >= 1, got {self.max_items}")


@dataclass
class GateConfig:
    """The approval policy (issue 7): every rule must hold for a version to become `champion`.

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
    use_intervals: bool = True
    """Decide on the report's paired 95% item-bootstrap intervals of candidate - base (and - champion) instead of
    point estimates: a gain must be shown (ID-Sim, champion: the LOWER bound >= delta / margin) and a drop must not
    be (ID-Conf: the UPPER bound >= -epsilon; face count: >= 0). A difference the evaluation cannot resolve thus
    neither approves (a +0.1 ID-Sim within noise) nor refuses (a -0.7 ID-Conf whose interval is [-3.9, +2.7]).
    false: the point estimates decide. A report without intervals fails these rules."""

    def __post_init__(self) -> None:
        if self.min_scored_references < 1:
            raise ConfigError(f"min_scored_references: expected >= 1, got {self.min_scored_references}")


@dataclass
class RegistryConfig:
    """MLflow model registry: what `umo register` creates and what `umo gate` decides."""

    model_name: str = "umo-flux2-klein-lora"
    gate: GateConfig = field(default_factory=GateConfig)

    def __post_init__(self) -> None:
        import re

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

    def __post_init__(self) -> None:
        if self.multipart_threshold_mb <= 0 or self.multipart_chunk_mb < 5:
            raise ConfigError(f"multipart_threshold_mb: expected > 0; multipart_chunk_mb: expected >= 5 (S3's "
                              f"smallest part), got {self.multipart_threshold_mb}, {self.multipart_chunk_mb}")


@dataclass
class TrackingConfig:
    """MLflow tracking (the main process of a run logs; the others never touch MLflow)."""

    tracking_uri: str | None = None
    """null = $MLFLOW_TRACKING_URI, else a local SQLite store at artifacts/mlflow/mlflow.db."""
    experiment: str = "umo"


@dataclass
class ToyCollectionConfig:
    """The toy world's raw image collection (groups of images, as from one album or video)."""

    n_groups: int = 40
    images_per_group: list[int] = field(default_factory=lambda: [6, 20])
    """[min, max] images per group."""
    cast_size: list[int] = field(default_factory=lambda: [2, 6])
    """[min, max] recurring identities per group."""
    image_size: list[int] = field(default_factory=lambda: [256, 256])
    """[height, width] px."""
    cast: list[int] | None = None
    """[first, last) identity ids: photo sessions of this cast, two people per image in a head strip (the toy
    base generator's photos; `umo.toyworld.collection`), instead of albums of the whole identity pool."""

    def __post_init__(self) -> None:
        if self.n_groups < 1:
            raise ConfigError(f"n_groups: expected >= 1, got {self.n_groups}")
        if self.cast is not None and (len(self.cast) != 2 or not 0 <= self.cast[0] < self.cast[1] - 1):
            raise ConfigError(f"cast: expected [first, last) with at least 2 ids, got {self.cast}")
        for name in ("images_per_group", "cast_size", "image_size"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or min(lo_hi) < 1 or (name != "image_size" and lo_hi[0] > lo_hi[1]):
                raise ConfigError(f"{name}: expected two positive integers{' [min, max]' * (name != 'image_size')}"
                                  f", got {lo_hi}")


@dataclass
class ToyDetectorConfig:
    """Training of the toy face detector (SCRFD layout); defaults take ~3 min on one CPU thread."""

    steps: int = 600
    """Optimizer steps (800 gave no gain: recall 0.954 vs 0.956, landmarks 3.0 vs 3.1 px)."""
    batch: int = 16
    """Scenes per step."""
    n_scenes: int = 1500
    """Pre-rendered training scenes (each also seen mirrored)."""
    lr: float = 3e-3
    """AdamW peak learning rate (cosine decay after a 5% warm-up)."""
    weight_decay: float = 1e-4
    width: int = 32
    """Base channel count of the network."""
    seed: int = 0


@dataclass
class ToyEmbedderConfig:
    """Training of one toy identity embedder (IResNet + ArcFace margin head)."""

    arch: Literal["toy_r10", "toy_r18", "r18", "r34", "r50", "r100"] = "toy_r10"
    num_features: int = 128
    """Embedding size."""
    epochs: int = 8
    batch: int = 128
    lr: float = 3e-3
    """AdamW peak learning rate (one-cycle schedule, 10% warm-up)."""
    weight_decay: float = 5e-4
    s: float = 32.0
    """ArcFace scale."""
    m: float = 0.5
    """ArcFace additive angular margin (radians)."""
    easy_margin: bool = False
    seed: int = 0
    identities: list[int] | None = None
    """[first, last): the training identity ids this embedder learns (null: all of them). The reward and the
    judge learn disjoint halves, so that an image made to please one does not please the other for free."""

    def __post_init__(self) -> None:
        if self.identities is not None and (len(self.identities) != 2
                                            or not 0 <= self.identities[0] < self.identities[1]):
            raise ConfigError(f"identities: expected [first, last) with 0 <= first < last, got {self.identities}")


@dataclass
class ToyQualityConfig:
    """Held-out quality gates of a toy-world build (a build below them is refused downstream)."""

    eval_scenes: int = 200
    """Fresh scenes of held-out identities the detector is measured on."""
    min_precision: float = 0.95
    min_recall: float = 0.95
    """Detector precision / recall at IoU 0.5."""
    min_tar: float = 0.90
    """Each embedder's TAR at FAR 1e-3 on held-out identities."""


@dataclass
class ToyWorldConfig:
    """`umo toyworld build`: the offline synthetic world, its raw collection and its face models."""

    world_seed: int = 0
    n_identities: int = 500
    """Identity pool; ids below n_train_identities train the face models, the rest are held out."""
    n_train_identities: int = 400
    faces_per_identity: int = 16
    """Embedder training crops per training identity."""
    test_faces_per_identity: int = 6
    """Verification crops per held-out identity."""
    collection: ToyCollectionConfig = field(default_factory=lambda: ToyCollectionConfig(
        n_groups=48, images_per_group=[6, 10], cast_size=[2, 3], image_size=[80, 128], cast=[400, 416]))
    """The raw collection (the embedded default's data/): photo sessions of the toy base's cast."""
    detector: ToyDetectorConfig = field(default_factory=ToyDetectorConfig)
    reward: ToyEmbedderConfig = field(
        default_factory=lambda: ToyEmbedderConfig(arch="toy_r18", epochs=6, seed=1, identities=[0, 200]))
    """The REWARD embedder (saved as an arcface_torch state dict)."""
    judge: ToyEmbedderConfig = field(
        default_factory=lambda: ToyEmbedderConfig(arch="toy_r10", epochs=8, seed=2, identities=[200, 400]))
    """The evaluation JUDGE (saved as an insightface ONNX recognizer): another seed, depth and set of people."""
    quality: ToyQualityConfig = field(default_factory=ToyQualityConfig)

    def __post_init__(self) -> None:
        if not 0 < self.n_train_identities < self.n_identities:
            raise ConfigError(f"n_train_identities: expected 0 < n_train_identities < n_identities "
                              f"({self.n_identities}), got {self.n_train_identities}")
        cast = self.collection.cast
        if cast is not None and not self.n_train_identities <= cast[0] < cast[1] <= self.n_identities:
            raise ConfigError(f"collection.cast: {cast} must lie in the held-out identities "
                              f"[{self.n_train_identities}, {self.n_identities}): the face models never saw the cast")
        for name, emb in (("reward", self.reward), ("judge", self.judge)):
            if emb.identities is not None and emb.identities[1] > self.n_train_identities:
                raise ConfigError(f"{name}.identities: {emb.identities} reaches past the training identities "
                                  f"(n_train_identities {self.n_train_identities}); held-out ids stay unseen")
        if self.reward.seed == self.judge.seed and self.reward.arch == self.judge.arch:
            raise ConfigError("judge: must differ from the reward embedder in seed or arch "
                              "(evaluation never uses the reward's own model)")


@dataclass
class ToyVaeConfig:
    """The toy base's VAE (klein's AutoencoderKLFlux2), trained as an autoencoder from scratch (`umo.toybase`)."""

    channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    """Block widths: 3 levels = 4x downsampling (8 px per image token after klein's 2x2 patches), 4 levels = 8x
    as the real VAE. Trained on varied people, a tiny 8x one blurred faces past the detector; trained on the toy
    base's 16-person cast alone, it keeps every face (issue 19, measured; docs/ablation.md)."""
    latent_channels: int = 4
    """Latent channels (4 at 4x; 16 at 8x: both 12x fewer numbers than pixels)."""
    steps: int = 800
    batch: int = 16
    crop: int = 64
    """Random square crops, px (half from targets, half from reference faces)."""
    lr: float = 2e-3
    kl_weight: float = 1e-6
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.channels) not in (3, 4):
            raise ConfigError(f"channels: expected 3 (4x) or 4 (8x) block widths, got {self.channels}")


@dataclass
class ToyTransformerConfig:
    """The base generator's transformer (FLUX.2 [klein] KV layout), trained with supervised flow matching."""

    heads: int = 4
    head_dim: int = 32
    double_blocks: int = 3
    single_blocks: int = 3
    steps: int = 1500
    batch: int = 8
    """Samples per step: more updates of fewer samples learned faster here than fewer of more (measured)."""
    lr: float = 1e-3
    """AdamW peak learning rate (linear warm-up, cosine decay)."""
    warmup: int = 100
    ema_decay: float | None = None
    """The saved base is this exponential moving average of the weights (null: the last weights). 0.999 with
    2500 steps did not beat 1500 steps without it (measured; docs/ablation.md)."""
    shift: float | None = 1.0
    """The base's scheduler: a static timestep shift (its sampler and its training times), or null for klein's
    resolution-dependent one (about 6.9 at 256 image tokens and 8 steps, made for megapixel images: it leaves
    a small image's last sampler step to jump from noise level 0.5 to 0)."""
    seed: int = 0
    mismatch_p: float = 0.0
    """Share of training samples whose references are another train photo's (drawn at random): the paper's
    identity confusion at its strongest, beside `photos.duplicate_p`. 0: none."""
    compile: bool = False
    """Train through `torch.compile` (inductor): about 25% less time per step on 2 CPU cores after about 80 s
    of compiling (measured; docs/ablation.md). The weights are the same module's either way."""


@dataclass
class ToyCastPhotosConfig:
    """The toy base's photos (`umo.toycast`): 2-person photos of the toy world's cast (its `collection.cast`, in
    its `collection.image_size` strip), person k in slot k."""

    cast: list[int] | None = None
    """[first, last) identity ids (null: the toy world's `collection.cast`); held out of the face models."""
    image_size: list[int] | None = None
    """[height, width] px of a photo (null: the toy world's `collection.image_size`)."""
    test_cast: list[int] | None = None
    """[first, last) ids of the TEST photos' people (null: the cast). Another range makes the open-set variant:
    people the base never drew (held out of the face models too)."""
    n_train: int = 3000
    """Train photos (each a new render: pose, light, expression, backdrop)."""
    n_test: int = 64
    """Held-out photos of the cast (new renders, new reference portraits): the base gate's items."""
    duplicate_p: float = 0.2
    """Share of TRAIN photos that show one of the two people twice and the other not at all, while the references
    stay the two people: the identity confusion the paper describes, put into the base's training data."""
    reference_size: int = 64
    """Saved reference crops, px."""
    crop_scale: float = 1.5
    """Reference crop side = this x the portrait's face box side."""
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.duplicate_p < 1:
            raise ConfigError(f"duplicate_p: expected 0 <= p < 1, got {self.duplicate_p}")


@dataclass
class ToyBaseGateConfig:
    """What the toy base must show on held-out photos of its cast before anything is fine-tuned from it."""

    min_two_face_rate: float = 0.85
    """Share of generated images in which the judge finds exactly 2 faces."""
    min_id_sim: float = 20.0
    """The judge's ID-Sim x100 (chance: about 1-9)."""
    id_conf: list[float] | None = field(default_factory=lambda: [45.0, 75.0])
    """[low, high] ID-Conf x100: above confusion at chance, below the real photos' (about 78): room to improve.
    null: no ID-Conf rule (only for tests of the chain's mechanics with an untrained base)."""
    images_per_item: int = 2
    steps: int = 8
    """Sampler steps."""


@dataclass
class ToyBaseConfig:
    """`umo toybase build`: the toy world's BASE generator, the stand-in for a pretrained customization model
    (a FLUX.2 [klein] folder trained from scratch on photos of a small cast; `umo.toycast`)."""

    out: str = "artifacts/toybase"
    toyworld: str = "artifacts/toyworld"
    """The built toy world: its face models make reference embeddings and judge the gate."""
    photos: ToyCastPhotosConfig = field(default_factory=ToyCastPhotosConfig)
    vae: ToyVaeConfig = field(default_factory=lambda: ToyVaeConfig(
        channels=[16, 32, 64, 64], latent_channels=8, steps=1000, crop=64))
    model: ToyTransformerConfig = field(default_factory=lambda: ToyTransformerConfig(
        steps=3400, batch=48, lr=1.5e-3, mismatch_p=0.1, compile=True))
    reference_resolution: list[int] = field(default_factory=lambda: [32, 32])
    sampler_steps: int = 8
    max_sequence_length: int = 4
    gate: ToyBaseGateConfig = field(default_factory=ToyBaseGateConfig)


@dataclass
class AblationConfig:
    """`ablation/dvc.yaml`: SFT vs SIR vs MIMR fine-tuning of the toy base, paired by seed (docs/ablation.md)."""

    out: str = "artifacts/ablation"
    toybase: str = "artifacts/toybase"
    """The built toy base (main dvc.yaml, stage `toybase`): its generator is every arm's base, its gate must have
    passed, and its held-out cast photos (photos/test.json) are the evaluation items."""
    train_manifest: str = "artifacts/prepared/samples/train.json"
    """What every arm fine-tunes on: the main chain's train samples (photo sessions of the cast)."""
    arms: list[str] = field(default_factory=lambda: ["sft", "sir", "mimr"])
    """sft: train.reward_weight 0; sir / mimr: reward.kind (every other setting is the params file's)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4, 5])
    """A seed fixes the data order, noise, t draws and LoRA init of a run, the same in every arm (the pairing)."""
    bootstrap: int = 4000
    """Resamples of the two-way cluster bootstrap (items, then seeds)."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.arms) - {"sft", "sir", "mimr"})
        if unknown or not self.arms:
            raise ConfigError(f"arms: expected some of sft, sir, mimr, got {self.arms}")
        if len(set(self.seeds)) != len(self.seeds) or not self.seeds:
            raise ConfigError(f"seeds: expected distinct seeds, got {self.seeds}")
        if self.bootstrap < 100:
            raise ConfigError(f"bootstrap: expected >= 100 resamples, got {self.bootstrap}")


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
    toyworld: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    toybase: ToyBaseConfig = field(default_factory=ToyBaseConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name}: expected a value in [0, 1], got {value}")


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
    return from_dict(Config, data, source=source)


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a nested dict in place; the value is parsed as a YAML scalar (1e-5, true, null)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected dotted.key=value")
    parts = key.strip().split(".")
    node = data
    for depth, part in enumerate(parts[:-1], start=1):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[:depth])} is a value, not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None


def write_overrides(path: str | Path, overrides: list[str] | tuple[str, ...]) -> Config:
    """Apply dotted `key=value` overrides to the params file itself (what `dvc exp run -S` does), keeping its
    comments and layout; validated first, so a bad key or value leaves the file untouched. Atomic."""
    from ruamel.yaml import YAML

    from umo.io import atomic_write_bytes

    config = load_config(path, overrides)  # raises ConfigError naming the key before anything is written
    path = Path(path)
    rt = YAML()  # round trip: comments, order and quoting survive
    rt.preserve_quotes = True
    rt.width = 4096
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    data = rt.load(path.read_text())
    for item in overrides:
        apply_override(data, item)
    text = io.StringIO()
    rt.dump(data, text)
    atomic_write_bytes(path, text.getvalue().encode())
    return config


def from_dict(cls: type, data: Any, *, source: str = "params", prefix: str = "") -> Any:
    """Build dataclass `cls` from plain data, rejecting unknown keys and wrong types with the key's full name."""
    where = prefix.rstrip(".") or "<top level>"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {prefix}{unknown[0]!s} (known keys of {where}: {', '.join(sorted(fields))})"
        )
    kwargs = {name: _coerce(hints[name], value, source, f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{source}: {prefix}{err}") from None


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(tp: Any, value: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source=source, prefix=f"{key}.")
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, source, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{source}: {key}: {value!r} matches none of {tp}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{source}: {key}: expected one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(item_tp, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 (PyYAML) reads 1e-6 as a string; YAML 1.2 and people mean a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"config field {key}: unsupported annotation {tp!r}")  # a schema bug, not user input


def to_dict(config: Any) -> dict[str, Any]:
    """The plain-data form of a config (what params.yaml would hold), for logging and `umo config`."""
    return dataclasses.asdict(config)
