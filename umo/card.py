"""The model card shipped with every registered version: Hugging Face front matter over the text people read.

The front matter (YAML between `---` lines, read by the Hub and by `huggingface_hub.ModelCard.load`) names the
base model, the library (diffusers), tags, the license and the candidate's evaluation as a `model-index`; the
body says what the model is, its evaluation table against the base (and the champion), its lineage, and its
use and limits. Pure text from its inputs: the registry writes `str(model_card(...))` to MODEL_CARD.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

if TYPE_CHECKING:
    from umo.config import LoraConfig

MODELS = ("base", "candidate", "champion")
ROWS = (("id_sim", "ID-Sim"), ("id_conf", "ID-Conf"), ("id_match", "ID-Match"),
        ("face_count_accuracy", "Face-count acc."), ("unscored", "Items unscored"),
        ("faces_scored", "Faces found (judge)"), ("references_scored", "References scored"))
"""The table's rows: the report's key, its label."""
HEADLINE = ROWS[:4]
"""The candidate's numbers that go into the front matter's model-index."""
TASK = "image-to-image"  # prompt and reference images in, one image out
LORA_SHA = "umo.lora_sha256"  # the lineage key of the LoRA file's sha256 (the registry's tag)


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def evaluation_table(metrics: dict) -> str:
    """The report's numbers as a Markdown table: a row per metric (ROWS), a column per model evaluated (base,
    candidate, champion) and the candidate's difference to the base. metrics: an evaluation report
    (umo.eval's metrics.json: {"base": {...}, "candidate": {...}, "delta": {...}, ...})."""
    models = [m for m in MODELS if m in metrics]
    lines = ["| metric | " + " | ".join(models) + " | Δ vs base |", "|---" * (len(models) + 2) + "|"]
    for key, label in ROWS:
        delta = metrics.get("delta", {}).get(key)
        lines.append(f"| {label} | " + " | ".join(_fmt(metrics[m].get(key)) for m in models)
                     + f" | {'–' if delta is None else f'{delta:+.4g}'} |")
    return "\n".join(lines)


def _eval_results(metrics: dict) -> list[EvalResult]:
    benchmark = str(metrics.get("benchmark"))
    candidate = metrics.get("candidate", {})
    return [EvalResult(task_type=TASK, dataset_type=benchmark, dataset_name=benchmark, metric_type=key,
                       metric_name=label, metric_value=candidate[key])
            for key, label in HEADLINE if candidate.get(key) is not None]


def model_card(name: str, *, base_model: str | None, family: str, lora: LoraConfig, metrics: dict, lineage: dict,
               license: str = "other") -> ModelCard:
    """The card of LoRA `name` on `base_model` (a Hub model id where there is one: the Hub links it).

    family: the generator family (a tag, e.g. flux2_klein); lora: the trained LoRA's settings; metrics: its
    evaluation report (`evaluation_table`; "toy_world" true adds the toy-world warning and tag); lineage:
    git_commit, dvc.data_md5, dvc.params_md5, umo.lora_sha256 and base_model (the local generator it was
    trained on). The candidate's ID-Sim, ID-Conf, ID-Match and face-count accuracy go into the model-index.
    """
    toy = bool(metrics.get("toy_world"))
    data = ModelCardData(
        base_model=base_model, library_name="diffusers", license=license, pipeline_tag=TASK, model_name=name,
        tags=["lora", "diffusers", "umo", "text-to-image", "image-to-image", family, *(["toy-world"] if toy else [])],
        eval_results=_eval_results(metrics) or None)
    body = "\n".join([
        f"# {name}", "",
        *(["> **Toy world.** Trained on procedurally drawn cartoon identities with tiny models, offline. It exists to",
           "> exercise the pipeline; it is not a usable model.", ""] if toy else []),
        "A LoRA for a multi-reference image generator, fine-tuned with ReReFL and the multi-identity matching reward",
        "of UMO (arXiv 2509.06818) so that each person in a multi-person image keeps their own identity.", "",
        "## Model", "",
        f"- base: `{lineage['base_model']}` (weights not included; point `generator.path` or `UMO_GENERATOR_PATH` at "
        "a local copy)",
        f"- LoRA: rank {lora.rank}, alpha {lora.alpha:g}, on {', '.join(lora.target_modules)}; "
        "`pytorch_lora_weights.safetensors` in the diffusers LoRA format (`pipe.load_lora_weights(folder)`), "
        "with alpha / rank folded into the weights, so diffusers and ComfyUI-style loaders apply the same scale",
        f"- sha256 {lineage[LORA_SHA]}", "",
        f"## Evaluation ({metrics.get('benchmark')})", "",
        "ID-Sim: similarity of each reference to its best generated face; ID-Conf: margin over the second best "
        "(identity confusion); ID-Match: mean Hungarian-assigned similarity; scored by a judge face model "
        "independent of the reward.", "", evaluation_table(metrics), "",
        "## Lineage", "",
        f"- git commit `{lineage['git_commit']}`",
        f"- data (DVC md5) `{lineage.get('dvc.data_md5', 'unknown')}`, params.yaml md5 "
        f"`{lineage.get('dvc.params_md5', 'unknown')}`", "",
        "## Use and limits", "",
        "Generates images of the people in the reference images. Use only with references of people who consented; "
        "identity similarity is measured by a face model and inherits its biases. Not for impersonation.", ""])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
