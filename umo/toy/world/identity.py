"""Toy-world identities: the stable traits of one synthetic person (NOT a real person).

An identity is everything that stays the same across the images of one toy person: head shape, colours,
hair style, eyes, brows, nose, mouth and an optional mark (mole, glasses, beard, ...). Per-image changes
(pose, lighting, expression) live in `umo.toy.world.face.FaceVariation`.

Why two identities never look alike (for ids below `MAX_IDENTITIES`):
- The four categorical traits (hair style 8 x mark 6 x hair colour family 7 x skin tone family 6 = 2016
  combinations) are NOT drawn at random: identity id i gets combination (a * i + b) mod 2016, with a
  coprime to 2016 and a, b drawn from the world seed. That map is a bijection, so two different ids always
  differ in at least one categorical trait, which `trait_distance` counts as 1.0; this is the enforced
  minimum (`MIN_TRAIT_DISTANCE`). The stride also spreads consecutive ids over all hair styles.
- On top of that, 29 continuous numbers (20 proportions and sizes, skin/hair/iris RGB) are drawn
  independently from `np.random.default_rng((world_seed, identity_id))`. Scaled to [0, 1] they lie ~2.0
  apart on average and, over the 124,750 pairs of 500 identities, never closer than ~0.9 (seeds 0, 1, 7),
  so the smallest `trait_distance` in a 500-person world is ~2.0, twice the enforced minimum (tested).

Canonical face units (used by the renderer): x right, y down, origin near the face centre, the head's
half-width is 1.0; `head_aspect` is the half-height. All lengths below are in these units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

HAIR_STYLES: tuple[str, ...] = (
    "bald",
    "short_cap",
    "fringe",
    "side_part",
    "long_sides",
    "spiky",
    "bun",
    "afro",
)
MARKS: tuple[str, ...] = ("none", "mole", "glasses", "beard", "mustache", "freckles")

# Base colours (RGB); each identity jitters its family's colour so no two share exactly one tone.
SKIN_TONES: tuple[tuple[int, int, int], ...] = (
    (252, 221, 196),
    (236, 190, 160),
    (222, 168, 122),
    (196, 134, 90),
    (150, 96, 62),
    (102, 64, 44),
)
HAIR_COLOURS: tuple[tuple[int, int, int], ...] = (
    (28, 24, 24),  # black
    (78, 50, 32),  # dark brown
    (138, 92, 54),  # light brown
    (224, 192, 122),  # blond
    (186, 80, 38),  # ginger
    (178, 176, 172),  # grey
    (0, 0, 0),  # dyed: the colour itself comes from DYED_COLOURS
)
DYED_COLOURS: tuple[tuple[int, int, int], ...] = (
    (58, 92, 200),
    (148, 62, 172),
    (40, 150, 122),
    (222, 92, 150),
)
IRIS_COLOURS: tuple[tuple[int, int, int], ...] = (
    (96, 58, 32),  # brown
    (54, 34, 22),  # dark brown
    (124, 104, 52),  # hazel
    (66, 128, 78),  # green
    (66, 116, 190),  # blue
    (118, 128, 140),  # grey
)

MAX_IDENTITIES = len(HAIR_STYLES) * len(MARKS) * len(HAIR_COLOURS) * len(SKIN_TONES)  # 2016
# Distinct ids below MAX_IDENTITIES differ in >= 1 categorical trait (see the module docstring).
MIN_TRAIT_DISTANCE = 1.0

# (low, high) of every continuous geometric trait, in canonical units unless said otherwise.
RANGES: dict[str, tuple[float, float]] = {
    "head_aspect": (1.18, 1.46),  # half-height / half-width of the head
    "jaw_width": (0.62, 0.95),  # face width left at the chin end of the jaw taper (1 = no taper)
    "chin_square": (2.0, 3.2),  # superellipse exponent of the lower face (2 = round, 3 = square)
    "ear_size": (0.17, 0.28),  # ear half-height
    "hairline": (0.58, 0.78),  # hairline height above the centre, as a fraction of head_aspect
    "hair_volume": (0.04, 0.2),  # how far hair stands off the skull
    "hair_length": (0.2, 0.9),  # long hair: below the chin; spikes/bun/afro: their size
    "eye_y": (-0.26, -0.13),  # eye-centre height
    "eye_spacing": (0.36, 0.46),  # half the distance between the eye centres
    "eye_size": (0.13, 0.19),  # half-width of the eye opening
    "eye_open": (0.42, 0.62),  # eye opening height / width
    "brow_gap": (0.15, 0.24),  # brow height above the eye centre
    "brow_thickness": (0.035, 0.085),
    "brow_arch": (-0.01, 0.07),
    "brow_tilt": (-0.06, 0.06),  # outer end up (+) or down (-)
    "nose_length": (0.4, 0.55),  # eye line to nose tip
    "nose_width": (0.09, 0.17),  # half-width of the nostrils
    "mouth_gap": (0.3, 0.4),  # nose tip to mouth line
    "mouth_width": (0.22, 0.32),  # half-width of the mouth (corner to centre)
    "lip_thickness": (0.035, 0.075),
}
_COLOUR_JITTER = {"skin": 12.0, "hair": 16.0, "iris": 16.0, "lip": 14.0}
# Salt separating the categorical-permutation stream from every per-identity stream (ids < MAX_IDENTITIES).
_PERMUTATION_SALT = MAX_IDENTITIES + 1


@dataclass(frozen=True)
class Identity:
    """Stable traits of one toy person; colours are RGB ints in 0..255, lengths in canonical face units.

    `hair_style` is one of HAIR_STYLES, `mark` one of MARKS. `mark_points` are canonical (x, y) spots used
    by the mark (a mole: one point; freckles: several; other marks: none).
    """

    world_seed: int
    identity_id: int
    hair_style: str
    mark: str
    skin_tone: int  # index into SKIN_TONES
    hair_tone: int  # index into HAIR_COLOURS
    skin_rgb: tuple[int, int, int]
    hair_rgb: tuple[int, int, int]
    brow_rgb: tuple[int, int, int]
    eye_rgb: tuple[int, int, int]
    lip_rgb: tuple[int, int, int]
    accent_rgb: tuple[int, int, int]  # glasses frame
    head_aspect: float
    jaw_width: float
    chin_square: float
    ear_size: float
    hairline: float
    hair_volume: float
    hair_length: float
    eye_y: float
    eye_spacing: float
    eye_size: float
    eye_open: float
    brow_gap: float
    brow_thickness: float
    brow_arch: float
    brow_tilt: float
    nose_length: float
    nose_width: float
    mouth_gap: float
    mouth_width: float
    lip_thickness: float
    mark_points: tuple[tuple[float, float], ...]

    @property
    def name(self) -> str:
        """The caption name, e.g. 'toy person 0042'."""
        return person_name(self.identity_id)


def person_name(identity_id: int) -> str:
    """How captions name a toy person.

    >>> person_name(42)
    'toy person 0042'
    """
    return f"toy person {identity_id:04d}"


def _jitter(rng: np.random.Generator, base: tuple[int, int, int], amount: float) -> tuple[int, int, int]:
    out = tuple(int(min(255, max(0, round(c + rng.uniform(-amount, amount))))) for c in base)
    return out  # type: ignore[return-value]


def _categorical_combination(world_seed: int, identity_id: int) -> tuple[int, int, int, int]:
    """(hair_style, mark, hair_tone, skin_tone) indices: a world-seeded bijection of the id (module doc)."""
    rng = np.random.default_rng((world_seed, _PERMUTATION_SALT))
    a = int(rng.integers(1, MAX_IDENTITIES))
    while math.gcd(a, MAX_IDENTITIES) != 1:
        a += 1
    b = int(rng.integers(0, MAX_IDENTITIES))
    c = (a * identity_id + b) % MAX_IDENTITIES
    n_style, n_mark, n_hair = len(HAIR_STYLES), len(MARKS), len(HAIR_COLOURS)
    return (
        c % n_style,
        (c // n_style) % n_mark,
        (c // (n_style * n_mark)) % n_hair,
        c // (n_style * n_mark * n_hair),
    )


def make_identity(world_seed: int, identity_id: int) -> Identity:
    """The toy person `identity_id` of world `world_seed`; deterministic (same arguments -> equal Identity).

    world_seed >= 0; identity_id in [0, MAX_IDENTITIES). Draws only from
    `np.random.default_rng((world_seed, identity_id))` (plus the world's categorical bijection), so one
    identity never depends on which others were made.
    """
    if world_seed < 0:
        raise ValueError(f"world_seed must be >= 0, got {world_seed}")
    if not 0 <= identity_id < MAX_IDENTITIES:
        raise ValueError(f"identity_id must be in [0, {MAX_IDENTITIES}), got {identity_id}")
    style, mark, hair_tone, skin_tone = _categorical_combination(world_seed, identity_id)
    rng = np.random.default_rng((world_seed, identity_id))
    geo = {k: float(rng.uniform(lo, hi)) for k, (lo, hi) in RANGES.items()}

    skin = _jitter(rng, SKIN_TONES[skin_tone], _COLOUR_JITTER["skin"])
    if HAIR_COLOURS[hair_tone] == (0, 0, 0):
        hair_base = DYED_COLOURS[int(rng.integers(0, len(DYED_COLOURS)))]
    else:
        hair_base = HAIR_COLOURS[hair_tone]
    hair = _jitter(rng, hair_base, _COLOUR_JITTER["hair"])
    iris = _jitter(rng, IRIS_COLOURS[int(rng.integers(0, len(IRIS_COLOURS)))], _COLOUR_JITTER["iris"])
    # Lips: the skin reddened and darkened by an identity-specific amount (from natural to lipstick).
    redness = float(rng.uniform(0.0, 1.0))
    lip_base = (
        int(skin[0] * (0.78 + 0.1 * redness)),
        int(skin[1] * (0.52 - 0.2 * redness)),
        int(skin[2] * (0.55 - 0.15 * redness)),
    )
    lip = _jitter(rng, lip_base, _COLOUR_JITTER["lip"])
    # Brows follow the hair but stay visibly darker than the skin (grey/blond/bald people still have brows).
    brow = tuple(int(c * 0.55) for c in hair)
    if sum(brow) > 0.6 * sum(skin):
        brow = tuple(int(c * 0.45) for c in skin)
    accent = tuple(int(v) for v in rng.integers(10, 200, size=3))

    mark_name = MARKS[mark]
    points: list[tuple[float, float]] = []
    if mark_name == "mole":
        side = -1.0 if rng.random() < 0.5 else 1.0
        points.append((side * float(rng.uniform(0.35, 0.62)), float(rng.uniform(0.15, 0.55))))
    elif mark_name == "freckles":
        for _ in range(int(rng.integers(8, 15))):
            side = -1.0 if rng.random() < 0.5 else 1.0
            x, dy = side * float(rng.uniform(0.14, 0.62)), float(rng.uniform(0.16, 0.42))
            points.append((x, geo["eye_y"] + dy))

    return Identity(
        world_seed=int(world_seed),
        identity_id=int(identity_id),
        hair_style=HAIR_STYLES[style],
        mark=mark_name,
        skin_tone=skin_tone,
        hair_tone=hair_tone,
        skin_rgb=skin,
        hair_rgb=hair,
        brow_rgb=brow,  # type: ignore[arg-type]
        eye_rgb=iris,
        lip_rgb=lip,
        accent_rgb=accent,  # type: ignore[arg-type]
        mark_points=tuple(points),
        **geo,
    )


def trait_vector(identity: Identity) -> np.ndarray:
    """(29,) float64 continuous traits in [0, 1]: geometry scaled by RANGES, colours by 255 per channel."""
    geo = [(getattr(identity, k) - lo) / (hi - lo) for k, (lo, hi) in RANGES.items()]
    colours = [c / 255.0 for rgb in (identity.skin_rgb, identity.hair_rgb, identity.eye_rgb) for c in rgb]
    return np.asarray(geo + colours, dtype=np.float64)


def _categorical(identity: Identity) -> tuple[str, str, int, int]:
    return identity.hair_style, identity.mark, identity.hair_tone, identity.skin_tone


def trait_distance(a: Identity, b: Identity) -> float:
    """How different two identities are: categorical mismatches (hair style, mark, hair colour family, skin
    tone family; 1.0 each) plus the Euclidean distance of their `trait_vector`s. 0.0 only for equal traits.

    >>> trait_distance(make_identity(0, 1), make_identity(0, 1))
    0.0
    >>> trait_distance(make_identity(0, 1), make_identity(0, 2)) >= MIN_TRAIT_DISTANCE
    True
    """
    mismatches = sum(x != y for x, y in zip(_categorical(a), _categorical(b)))
    return float(mismatches) + float(np.linalg.norm(trait_vector(a) - trait_vector(b)))


def pairwise_trait_distances(identities: list[Identity]) -> np.ndarray:
    """(N, N) float64 `trait_distance` of every pair (0 on the diagonal), vectorized for whole worlds."""
    vec = np.stack([trait_vector(i) for i in identities])
    cat = np.array([[HAIR_STYLES.index(i.hair_style), MARKS.index(i.mark), i.hair_tone, i.skin_tone]
                    for i in identities])
    mismatches = (cat[:, None, :] != cat[None, :, :]).sum(axis=2).astype(np.float64)
    diff = vec[:, None, :] - vec[None, :, :]
    return mismatches + np.sqrt((diff * diff).sum(axis=2))
