"""The toy world's sections of params.yaml (`toyworld`, `toybase`, `ablation`), registered with the product's
loader through the `umo.extensions` entry point (umo.toy.extension): the product's schema never names them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from umo.config import ConfigError

MAX_IDENTITIES = 2016
"""Distinct toy people: umo.toy.world.identity.MAX_IDENTITIES, not imported here (that package loads OpenCV, and
every params.yaml load reads this module); the tests check that the two agree."""


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
    base generator's photos; `umo.toy.world.collection`), instead of albums of the whole identity pool."""

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
    """Training of one toy identity embedder (an IResNet or a MobileFaceNet + ArcFace margin head)."""

    arch: Literal["toy_r10", "toy_r18", "r18", "r34", "r50", "r100", "toy_mbf"] = "toy_r10"
    """IResNet (`umo.faces.embed`) or toy_mbf: a MobileFaceNet (`umo.toy.world.mobileface`; judges only, the
    reward is read as an IResNet)."""
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
    second_judge: ToyEmbedderConfig | None = field(default_factory=lambda: ToyEmbedderConfig(
        arch="toy_mbf", epochs=8, lr=0.01, seed=3, identities=[500, 700]))
    """A SECOND evaluation judge (ONNX recognizer, its own pack folder), or null for none: another architecture
    (MobileFaceNet) trained on people past the identity pool (ids >= n_identities, procedurally generated as the
    others), whom neither the reward, the first judge, the cast nor the held-out verification ids include. Scores
    that several judges agree on are harder to get by fooling one of them. lr 0.01: at 3e-3 it reached TAR@FAR1e-3
    0.88, at 0.01 0.96 (8 epochs, the same 250 s)."""
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
        if self.reward.arch == "toy_mbf":
            raise ConfigError("reward.arch: the reward is saved and read as an arcface_torch IResNet; "
                              "toy_mbf (a MobileFaceNet) can only be a judge")
        if self.second_judge is not None:
            self._check_second_judge(self.second_judge)

    def _check_second_judge(self, second: ToyEmbedderConfig) -> None:
        """Its people are nobody else's: not held out (verification, the cast), not the reward's, not the judge's."""
        if second.identities is None:
            raise ConfigError("second_judge.identities: expected [first, last), e.g. past the identity pool "
                              f"[{self.n_identities}, ...), got null (all training ids: the reward's and the "
                              "judge's)")
        first, last = second.identities
        if last > MAX_IDENTITIES:
            raise ConfigError(f"second_judge.identities: {second.identities} reaches past the {MAX_IDENTITIES} "
                              "distinct toy identities")
        everyone = [0, self.n_train_identities]  # what an embedder without `identities` learns
        others = {"the held-out ids (verification and the cast)": [self.n_train_identities, self.n_identities],
                  "reward.identities": self.reward.identities or everyone,
                  "judge.identities": self.judge.identities or everyone}
        for name, (lo, hi) in others.items():
            if first < hi and lo < last:
                raise ConfigError(f"second_judge.identities: {second.identities} overlaps {name} [{lo}, {hi}); "
                                  f"its people must be nobody else's (e.g. [{self.n_identities}, ...): past the "
                                  "pool)")
        if second.seed == self.judge.seed and second.arch == self.judge.arch:
            raise ConfigError("second_judge: must differ from the judge in seed or arch (else it is the same "
                              "model)")


@dataclass
class ToyVaeConfig:
    """The toy base's VAE (klein's AutoencoderKLFlux2), trained as an autoencoder from scratch (`umo.toy.base`)."""

    channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    """Block widths: 3 levels = 4x downsampling (8 px per image token after klein's 2x2 patches), 4 levels = 8x
    as the real VAE. Trained on varied people, a tiny 8x one blurred faces past the detector; trained on the toy
    base's 16-person cast alone, it keeps every face (measured; docs/ablation.md)."""
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
    """The toy base's photos (`umo.toy.cast`): 2-person photos of the toy world's cast (its `collection.cast`, in
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
class ToyScalingConfig:
    """`umo toybase scaling`: the scaling set, items of more and more people of the cast (XVerseBench JSON)."""

    identities: list[int] = field(default_factory=lambda: [2, 10])
    """[fewest, most] people per item (every count in between)."""
    items_per_count: int = 6
    """Items per number of people, each a new draw of people and of their reference portraits."""
    seed: int = 0
    out: str = "artifacts/scaling"
    """The set's folder: scaling.json and human/ (what `eval.scaling.path` reads)."""

    def __post_init__(self) -> None:
        if len(self.identities) != 2 or not 1 <= self.identities[0] <= self.identities[1]:
            raise ConfigError(f"identities: expected [fewest, most] with 1 <= fewest <= most, got {self.identities}")
        if self.items_per_count < 1:
            raise ConfigError(f"items_per_count: expected >= 1, got {self.items_per_count}")


@dataclass
class ToyBaseConfig:
    """`umo toybase build`: the toy world's BASE generator, the stand-in for a pretrained customization model
    (a FLUX.2 [klein] folder trained from scratch on photos of a small cast; `umo.toy.cast`)."""

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
    scaling: ToyScalingConfig = field(default_factory=ToyScalingConfig)
    """The scaling set of the cast (its people and reference portraits as the photos make them)."""


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
