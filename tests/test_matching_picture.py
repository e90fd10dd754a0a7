"""The picture of the matching: boxes, the Hungarian pairs as lines in each reference's colour, the unmatched
face and the reference that got no face marked, on a hand-built case."""

import numpy as np
from PIL import ImageColor

from umo.eval.matching import COLOURS, UNMATCHED, matching_picture


def colour(name: str) -> tuple[int, int, int]:
    return ImageColor.getrgb(name)


def test_pairs_unmatched_faces_and_faceless_references_are_drawn_where_they_belong():
    image = np.full((64, 64, 3), 255, np.uint8)  # a white 64 px image: every mark stands out
    boxes = np.array([[4, 4, 16, 16], [20, 10, 40, 30], [44, 40, 60, 60]], float)
    # reference 1 resembles face 2 most, reference 2 face 1; a greedy choice would agree here, the point is the
    # third face: no reference is left for it
    sim = np.array([[0.2, 0.9, 0.1], [0.8, 0.3, 0.0]])
    refs = [np.zeros((32, 32, 3), np.uint8), np.zeros((48, 48, 3), np.uint8)]
    pic = matching_picture(image, boxes, sim, refs, height=256)
    # layout: thumbnails 96 px (256 // 2 - 8 is more than the 96 cap), the image from x = 8 + 96 + 72 = 176,
    # enlarged x4 from y = 8
    left, top, k = 176, 8, 4
    assert pic.shape == (256 + 8 + 14, left + 256 + 8, 3)  # a caption line below

    def at(x, y):
        return tuple(int(v) for v in pic[int(y), int(x)])

    # face 2's box in reference 1's colour, face 1's in reference 2's: on the left edge of each box
    assert at(left + 20 * k, top + 20 * k) == colour(COLOURS[0])
    assert at(left + 4 * k, top + 10 * k) == colour(COLOURS[1])
    # face 3, matched to nobody: a grey dashed box (the first dash starts at the corner)
    assert at(left + 44 * k + 1, top + 40 * k) == colour(UNMATCHED)
    # the pair's line leaves reference 1's thumbnail (right edge, middle) in its colour
    assert at(8 + 96 + 2, 8 + 48) == colour(COLOURS[0])


def test_a_reference_without_a_face_is_crossed_out():
    image = np.full((64, 64, 3), 255, np.uint8)
    refs = [np.full((32, 32, 3), 255, np.uint8)] * 2
    # one face for two people: reference 1 (0.7) gets it; reference 2 is crossed out in red
    pic = matching_picture(image, np.array([[10, 10, 30, 30]], float), np.array([[0.7], [0.6]]), refs, height=128)
    thumb = 128 // 2 - 8  # 56
    top2 = 8 + thumb + 8
    mid = (8 + thumb // 2, top2 + thumb // 2)  # the centre of the crossed-out thumbnail
    assert tuple(int(v) for v in pic[mid[1], mid[0]]) == colour("#d32f2f")
    # no face at all: both crossed out, the image is still drawn
    none = matching_picture(image, np.zeros((0, 4)), np.zeros((2, 0)), refs, height=128)
    assert tuple(int(v) for v in none[mid[1], mid[0]]) == colour("#d32f2f")
