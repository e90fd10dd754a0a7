"""Captions of toy-world scenes: who is where, left to right, and the setting.

Every caption names each person as `person_name(id)` ('toy person 0123') in left-to-right order, so
`NAME_PATTERN.findall(caption)` recovers the identity ids in the order of the scene's boxes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from umo.toy.world.identity import person_name

NAME_PATTERN = re.compile(r"toy person (\d{4})", re.IGNORECASE)
_OPENINGS = ("", "A photo of ", "A picture of ", "A snapshot of ")


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def make_caption(identity_ids: Sequence[int], setting: str, rng: np.random.Generator) -> str:
    """Caption for people `identity_ids` (LEFT TO RIGHT) in `setting` ('in a park'); wording varies with rng.

    >>> make_caption([123, 456], "in a park", np.random.default_rng(1))
    'A photo of toy person 0123 on the left and toy person 0456 on the right, in a park'
    """
    if not identity_ids:
        raise ValueError("a caption needs at least one identity")
    names = [person_name(int(i)) for i in identity_ids]
    opening = _OPENINGS[int(rng.integers(0, len(_OPENINGS)))]
    if len(names) == 1:
        return _capitalize(f"{opening}{names[0]} {setting}")
    if len(names) == 2:
        return _capitalize(f"{opening}{names[0]} on the left and {names[1]} on the right, {setting}")
    listed = ", ".join(names[:-1]) + f" and {names[-1]}"
    if rng.random() < 0.5:
        return f"From left to right: {listed}, {setting}"
    return _capitalize(f"{opening}{listed}, from left to right, {setting}")


def caption_ids(caption: str) -> list[int]:
    """The identity ids a caption names, in order.

    >>> caption_ids("From left to right: toy person 0007, toy person 0100 and toy person 0003, on a stage")
    [7, 100, 3]
    """
    return [int(m) for m in NAME_PATTERN.findall(caption)]
