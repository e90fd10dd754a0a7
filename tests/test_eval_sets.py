"""Evaluation set loaders on small files in the real formats, written here."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from umo.eval.sets import EvalSetError, load_xverse


def png(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
    return path


def xverse_item(index, *paths, prompt="two people at a cafe"):
    return {"index": index, "prompt": prompt,
            "modulation": [{"src_inputs": [{"image_path": p, "caption": "x"} for p in paths]}]}


@pytest.fixture()
def bench(tmp_path):
    root = tmp_path / "XVerseBench"
    for rel in ["sample/human/a.png", "sample/human/b.png", "sample/object/cup.png", "sample/animal/cat.png"]:
        png(root / rel)
    return root


def test_xverse_items_score_only_the_human_references(bench):
    file = bench / "multi.json"
    file.write_text(json.dumps([xverse_item(0, "sample/human/a.png", "sample/object/cup.png", "sample/human/b.png"),
                                xverse_item(1, "sample/object/cup.png", "sample/animal/cat.png")]))
    left_out = Counter()
    items = load_xverse(file, left_out=left_out)
    assert [i.id for i in items] == ["0"] and left_out == {"no_human_reference": 1}  # item 1 has no person
    assert items[0].identities == (0, 2) and len(items[0].references) == 3
    assert items[0].references[2] == (bench / "sample/human/b.png").resolve()


@pytest.mark.parametrize("bad, message", [
    ("../outside.png", "leaves the benchmark root"),
    ("/etc/passwd", "must be a relative path"),
    ("sample/human/missing.png", "not found"),
])
def test_xverse_paths_may_not_escape_the_root(bench, bad, message):
    png(bench.parent / "outside.png")
    file = bench / "bad.json"
    file.write_text(json.dumps([xverse_item(7, bad)]))
    with pytest.raises(EvalSetError, match=message) as err:
        load_xverse(file)
    assert str(file) in str(err.value) and "item 0 (7)" in str(err.value)


def test_xverse_symlinks_out_of_the_root_are_refused(bench, tmp_path):
    (bench / "sample/human/link.png").symlink_to(png(tmp_path / "secret.png"))
    file = bench / "bad.json"
    file.write_text(json.dumps([xverse_item(0, "sample/human/link.png")]))
    with pytest.raises(EvalSetError, match="leaves the benchmark root"):
        load_xverse(file)


def test_xverse_format_mistakes_name_the_item(bench):
    file = bench / "bad.json"
    file.write_text(json.dumps([xverse_item(0, "sample/human/a.png"), {"index": 1, "prompt": "x"}]))
    with pytest.raises(EvalSetError, match="item 1: expected"):
        load_xverse(file)
    file.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(EvalSetError, match="expected a JSON list"):
        load_xverse(file)


def write_omnicontext(root, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "data" / "test-00000-of-00001.parquet")


def test_omnicontext_parquet_images_are_extracted_and_characters_scored(tmp_path):
    import io

    def png_bytes(seed):
        buf = io.BytesIO()
        Image.fromarray(np.full((16, 16, 3), seed, np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    root = tmp_path / "OmniContext"
    png(root / "images" / "local.png")
    rows = [{"key": "m1", "task_type": "multiple_character", "instruction": "two people meet",
             "input_images": [{"bytes": png_bytes(1), "path": None}, {"bytes": None, "path": "images/local.png"}]},
            {"key": "o1", "task_type": "single_object", "instruction": "a cup",
             "input_images": [{"bytes": png_bytes(2), "path": None}]}]
    write_omnicontext(root, rows)
    from umo.eval.sets import load_omnicontext

    items = load_omnicontext(root, tmp_path / "extracted")
    assert [i.id for i in items] == ["m1"] and items[0].identities == (0, 1)
    assert items[0].references[0].read_bytes() == png_bytes(1)
    assert items[0].references[1] == (root / "images" / "local.png").resolve()
    # keys with dots: each item keeps its own extracted image (`with_suffix` once named both "scene.png")
    dotted = [{"key": f"scene.{k}", "task_type": "single_character", "instruction": "a person",
               "input_images": [{"bytes": png_bytes(10 + k), "path": None}]} for k in (1, 2)]
    write_omnicontext(tmp_path / "dots", dotted)
    scenes = load_omnicontext(tmp_path / "dots", tmp_path / "extracted-dots")
    assert [i.references[0].read_bytes() for i in scenes] == [png_bytes(11), png_bytes(12)]
    assert len({i.references[0] for i in scenes}) == 2
    rows[0]["input_images"][1]["path"] = "../../escape.png"
    (tmp_path / "again").mkdir()
    write_omnicontext(tmp_path / "again", rows)
    with pytest.raises(EvalSetError, match="leaves the benchmark root"):
        load_omnicontext(tmp_path / "again", tmp_path / "extracted")
