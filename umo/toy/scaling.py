"""The scaling set: items of 2 to 10 people of the toy base's cast, in the XVerseBench JSON format.

The paper's title claim is scaling to more identities, and peers report identity collapse rising from about 50%
at 2 subjects to about 97% at 10. This set asks the same question of our chain: for each number of people n in
`toybase.scaling.identities`, `items_per_count` items, each n different people of the cast (drawn anew) with a
new reference portrait of each, cropped as the base's photos crop them. `umo evaluate --scaling` generates and
judges it like any benchmark, and its report breaks every metric down by the number of people
(plots/by_identities.json and by_identities.png).

No target image: the toy base draws its photos as 80 x 128 strips of two people, and nobody can lay out ten
faces in that strip as a ground truth would. So Sim(GT) and copy-paste are not measured here (the report says
so); ID-Sim, ID-Conf, face-count accuracy and collapse are.

    <out>/scaling.json     [{index, prompt, modulation: [{src_inputs: [{image_path, caption}]}]}, ...]
    <out>/human/<index>-<k>.png   reference k of an item (a folder named `human`: XVerseBench's scored inputs)
    <out>/stats.json       the counts and the settings
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from umo.io import atomic_dir
from umo.toy.base import _reference_crop
from umo.toy.cast import cast_of
from umo.toy.config import ToyBaseConfig
from umo.toy.world.build import load_toyworld
from umo.toy.world.identity import make_identity
from umo.toy.world.render import render_portrait

log = logging.getLogger(__name__)

SET_FILE = "scaling.json"
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def _count_word(n: int) -> str:
    return WORDS[n] if n < len(WORDS) else str(n)


def plan(cfg: ToyBaseConfig, cast: tuple[int, int]) -> list[tuple[str, list[int], int]]:
    """Every item's (index, people's identity ids, render seed), by number of people then item; deterministic
    in the settings. Fewer cast members than people is an error naming the setting."""
    s = cfg.scaling
    people = np.arange(*(cfg.photos.test_cast or cast))
    if s.identities[1] > len(people):
        raise ValueError(f"toybase.scaling.identities {s.identities}: the cast has only {len(people)} people "
                         f"({cfg.photos.test_cast or list(cast)})")
    rng = np.random.default_rng([s.seed, 23])
    rows = []
    for n in range(s.identities[0], s.identities[1] + 1):
        for k in range(s.items_per_count):
            ids = [int(i) for i in rng.choice(people, n, replace=False)]
            rows.append((f"n{n:02d}-{k:03d}", ids, int(rng.integers(0, 2**31 - 1))))
    return rows


def write_scaling_set(cfg: ToyBaseConfig, out: str | Path | None = None) -> dict[str, Any]:
    """Write the scaling set of the toy base's cast into `out` (default cfg.scaling.out), atomically: a reader
    sees the previous set or the new one. Returns its stats."""
    world = load_toyworld(cfg.toyworld)
    cast, _ = cast_of(cfg, world)
    out = Path(out or cfg.scaling.out)
    rows = plan(cfg, cast)
    items = []
    with atomic_dir(out) as tmp:
        (tmp / "human").mkdir()
        for index, ids, seed in rows:
            rng = np.random.default_rng([cfg.photos.seed, seed])
            inputs = []
            for k, identity in enumerate(ids):
                portrait = render_portrait(make_identity(world.config.world_seed, identity), rng, (128, 128))
                crop = _reference_crop(portrait.image, portrait.boxes[0], cfg.photos.crop_scale,
                                       cfg.photos.reference_size)
                path = f"human/{index}-{k}.png"
                Image.fromarray(crop).save(tmp / path)
                inputs.append({"image_path": path, "caption": f"person {k + 1}"})
            items.append({"index": index, "prompt": f"a group photo of {_count_word(len(ids))} people",
                          "modulation": [{"src_inputs": inputs}], "identities": ids})
        (tmp / SET_FILE).write_text(json.dumps(items, indent=1) + "\n")
        counts = {str(n): sum(len(i["identities"]) == n for i in items)
                  for n in range(cfg.scaling.identities[0], cfg.scaling.identities[1] + 1)}
        stats = {"items": len(items), "references": sum(len(i["identities"]) for i in items),
                 "items_by_identities": counts, "cast": list(cfg.photos.test_cast or cast),
                 "settings": {"identities": cfg.scaling.identities, "items_per_count": cfg.scaling.items_per_count,
                              "seed": cfg.scaling.seed, "reference_size": cfg.photos.reference_size,
                              "crop_scale": cfg.photos.crop_scale}}
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    log.info("scaling set: %d items, %d references in %s", stats["items"], stats["references"], out)
    return stats
