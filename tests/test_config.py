"""params.yaml loading: defaults, overrides, and clear errors for unknown keys and wrong types."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from umo.config import Config, ConfigError, load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]


def test_repo_params_match_schema_defaults():
    """The checked-in params.yaml loads, and says exactly what the dataclass defaults say (one truth)."""
    assert to_dict(load_config(ROOT / "params.yaml")) == to_dict(Config())


def test_overrides_are_typed(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("reward:\n  kind: mimr\n")
    config = load_config(params, ["reward.kind=sir", "reward.matched_weight=2", "faces.detector.input_size=[64, 96]",
                                  "faces.detector.pack=null"])
    assert config.reward.kind == "sir"
    assert config.reward.matched_weight == 2.0 and isinstance(config.reward.matched_weight, float)
    assert config.faces.detector.input_size == [64, 96]
    assert config.faces.detector.pack is None


@pytest.mark.parametrize(
    "text, message",
    [
        ("reward:\n  kindd: sir\n", r"params.yaml: unknown key reward.kindd \(known keys of reward: kind,"),
        ("rewards: {}\n", "unknown key rewards"),
        ("reward:\n  kind: ppo\n", r"reward.kind: expected one of \['mimr', 'sir'\], got 'ppo'"),
        ("reward:\n  max_faces: 2.5\n", "reward.max_faces: expected an integer, got 2.5"),
        ("reward:\n  max_faces: 0\n", "reward.max_faces: expected >= 1, got 0"),
        ("reward:\n  matched_weight: yes\n", "reward.matched_weight: expected a number, got True"),
        ("faces:\n  detector:\n    det_thresh: 1.5\n", r"faces.detector.det_thresh: expected a value in \[0, 1\]"),
        ("faces:\n  detector: 3\n", "faces.detector: expected a mapping"),
        ("faces:\n  detector:\n    input_size: [100, 64]\n", "input_size: expected"),
        ("faces:\n  judge:\n    pack: x\n", r"faces.judge is now faces.judges, a list of judges whose first decides"),
        ("faces:\n  judges: []\n", r"faces.judges: expected at least one judge"),
        ("faces:\n  judges: [{pack: a}, {pack: b, name: a}]\n", r"faces.judges: two judges are named alike \(\['a', 'a'\]\)"),
        ("faces:\n  judges: {pack: a}\n", "faces.judges: expected a list"),
        ("eval:\n  scaling:\n    images_per_item: 0\n", "eval.scaling.images_per_item: expected >= 1, got 0"),
        ("toybase:\n  scaling:\n    identities: [3, 2]\n", r"toybase.scaling.identities: expected \[fewest, most\]"),
        ("train:\n  anchor_weight: -1\n", "train.anchor_weight: expected >= 0, got -1"),
        ("train:\n  judge_every: -1\n", "train.judge_every: expected >= 0, got -1"),
        ("- 1\n- 2\n", "expected a mapping at the top level"),
        ("reward: [\n", "not valid YAML"),
    ],
)
def test_bad_params_name_file_and_key(tmp_path, text, message):
    params = tmp_path / "params.yaml"
    params.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(params)
    assert "params.yaml" in str(info.value)


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(None, ["reward.kind"])
    with pytest.raises(ConfigError, match="reward.kind is a value, not a section"):
        load_config(None, ["reward.kind=sir", "reward.kind.x=1"])
    with pytest.raises(ConfigError, match="params file not found"):
        load_config(tmp_path / "nope.yaml")


def test_cli_help_and_config(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "umo.cli", *a], capture_output=True, text=True, cwd=ROOT)
    out = run("--help")
    assert out.returncode == 0 and "config" in out.stdout and "faces" in out.stdout
    out = run("config", "-S", "reward.kind=sir")
    assert out.returncode == 0 and yaml.safe_load(out.stdout)["reward"]["kind"] == "sir"
    out = run("config", "-S", "reward.kindd=sir")
    assert out.returncode == 2 and "unknown key reward.kindd" in out.stderr and "Traceback" not in out.stderr


def test_cli_faces_detect(tmp_path, capsys):
    """`umo faces detect` loads the configured pack through the real loader and prints JSON per image."""
    import json

    import cv2

    from umo.cli import main
    from umo.toy.onnx_export import export_detector_onnx
    from umo.toy.tiny.faces import MarkerDetector, identity_patch, paste_faces, random_background

    export_detector_onnx(MarkerDetector(face_size=64), tmp_path / "pack" / "det_marker.onnx")
    image, landmarks = paste_faces(random_background(0, 192, 256), [(identity_patch(1, 64), (96.0, 96.0))], 64)
    cv2.imwrite(str(tmp_path / "one.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    params = tmp_path / "params.yaml"
    params.write_text(f"faces:\n  detector:\n    root: {tmp_path}\n    pack: pack\n")

    status = main(["faces", "detect", "--params", str(params), str(tmp_path / "one.png"), str(tmp_path / "broken.png")])
    assert status == 1  # the broken file is reported, the good one still detected
    (line,) = capsys.readouterr().out.strip().splitlines()
    (face,) = json.loads(line)["faces"]
    np.testing.assert_allclose(face["landmarks"], landmarks[0], atol=1.0)

    params.write_text(f"faces:\n  detector:\n    root: {tmp_path / 'nowhere'}\n")
    assert main(["faces", "detect", "--params", str(params), str(tmp_path / "one.png")]) == 2


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads `1e-6` as a string; a float setting takes it as the number it means."""
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  learning_rate: 5e-6\ntoybase:\n  vae:\n    kl_weight: 1E-06\n")
    config = load_config(path, ["train.weight_decay=1e-2"])
    assert (config.train.learning_rate, config.section("toybase").vae.kl_weight, config.train.weight_decay) == (5e-6, 1e-6, 0.01)
    with pytest.raises(ConfigError, match="train.learning_rate: expected a number, got 'e-6'"):
        load_config(path, ["train.learning_rate=e-6"])
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(path, ["train.max_steps=1e3"])


def test_the_committed_json_schema_is_current_and_says_what_the_loader_says():
    """params.schema.json (what editors read) is `umo config --schema`'s output, and agrees with the loader:
    params.yaml passes it; an unknown key, a wrong type and a bad choice fail it, as they fail load_config."""
    import json

    import jsonschema

    from umo.config import params_schema

    committed = json.loads((ROOT / "params.schema.json").read_text())
    assert committed == params_schema(), "regenerate: umo config --schema > params.schema.json"
    assert (ROOT / "params.yaml").read_text().startswith("# yaml-language-server: $schema=params.schema.json")
    validator = jsonschema.Draft202012Validator(committed)
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert not list(validator.iter_errors(data))
    assert {"toyworld", "toybase", "ablation", "train"} <= set(committed["properties"])  # the wing's sections too
    docs = committed["$defs"]["PrepareConfig"]["properties"]["max_caption_chars"]
    assert docs["default"] == 2000 and "caption_truncated" in docs["description"]
    for path, value in ((("reward", "kindd"), 1), (("train", "max_steps"), "ten"), (("reward", "kind"), "best"),
                        (("toyworld", "world_seed"), 1.5)):
        bad = yaml.safe_load((ROOT / "params.yaml").read_text())
        bad[path[0]][path[1]] = value
        assert list(validator.iter_errors(bad)), path
        with pytest.raises(ConfigError, match=path[1] if path[1] != "kind" else "expected one of"):
            from umo.config import config_from_dict

            config_from_dict(bad)
