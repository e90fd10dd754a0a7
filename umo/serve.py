"""Generation with a trained LoRA: the code that `umo generate` and the registered MLflow model both run.

A *package* is what registration and deployment ship: the LoRA (`pytorch_lora_weights.safetensors`) beside
`config.json`, whose `serving` section (`ServeSettings`) says how to generate with it: the generator settings
(family, local folder, resolutions), the sampling steps, how many references the model was trained with (more
is refused), and the face detector that checks each reference. A LoRA without a package (a training run's
`lora/`) takes these from params.yaml (`serve_settings`).

`LoraGenerator` loads the base generator with the LoRA, and checks the references before any sampling:
- a reference that is missing or not an image is a GenerationError naming it;
- more references than `max_references`, or none, is a GenerationError;
- a reference in which the detector finds no face (of at least `min_face_size` pixels) is a GenerationError
  naming it: the model would have no identity to keep, and the image would be scored against nobody.

Where a package was made on another machine, `UMO_GENERATOR_PATH` and `UMO_DETECTOR_ROOT` point at the local
copies of the base generator and the detector pack (weights never travel with a LoRA).

`UmoLoraModel` is the MLflow pyfunc (logged from code, `umo/mlflow_model.py`, with umo's sources as its
code_paths): rows of (prompt, references as base64-encoded image files, seed) -> one base64 PNG per row.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from umo.images import BadImage, decode_rgb, decode_rgb_bytes, fit_signed
from umo.package import GenerationError, ServeSettings

log = logging.getLogger(__name__)

MAX_REFERENCE_PIXELS = 64_000_000  # a reference above this is refused before it is decoded (a pixel bomb)


@dataclass
class Reference:
    """One reference image: `name` is how errors call it; `source` a file path or the encoded bytes."""

    name: str
    source: Path | bytes

    def decode(self) -> np.ndarray:
        try:
            if isinstance(self.source, bytes):
                return decode_rgb_bytes(self.source, self.name, max_pixels=MAX_REFERENCE_PIXELS)[0]
            if not Path(self.source).is_file():
                raise GenerationError(f"reference {self.name}: no such file")
            return decode_rgb(self.source, max_pixels=MAX_REFERENCE_PIXELS)[0]
        except BadImage as err:
            raise GenerationError(f"reference {self.name}: not a usable image ({err})") from err


class LoraGenerator:
    """The base generator with a LoRA, plus the reference checks (see the module docstring)."""

    def __init__(self, settings: ServeSettings, lora: str | Path, *, device: str | torch.device | None = None) -> None:
        """device: None = the GPU where torch sees one, else the CPU."""
        # lazy: diffusers, peft and onnxruntime load only when a model is built
        from umo.faces.detect import FaceDetector
        from umo.models import load_generator
        from umo.models.lora import attach_lora_file

        self.settings = settings
        gen = settings.generator
        if os.environ.get("UMO_GENERATOR_PATH"):
            gen = dataclasses.replace(gen, path=os.environ["UMO_GENERATOR_PATH"])
        if not Path(gen.path).is_dir():
            raise GenerationError(f"{gen.path}: no generator folder (the base model, {gen.family}); point "
                                  "UMO_GENERATOR_PATH at a local copy")
        self.model = load_generator(gen, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
        attach_lora_file(self.model.transformer, lora, "umo")
        self.model.transformer.set_adapter("umo")
        self.detector = None
        if settings.detector is not None:
            det = settings.detector
            if os.environ.get("UMO_DETECTOR_ROOT"):
                det = dataclasses.replace(det, root=os.environ["UMO_DETECTOR_ROOT"])
            if not (Path(det.root) / (det.pack or "")).is_dir():
                raise GenerationError(f"{Path(det.root) / (det.pack or '')}: no face detector pack (it checks each "
                                      "reference for a face); point UMO_DETECTOR_ROOT at a local copy")
            self.detector = FaceDetector.from_config(det, providers=settings.providers)

    def references(self, refs: Sequence[Reference]) -> list[torch.Tensor]:
        """The references checked (count, decoding, a face in each) and prepared for the generator."""
        limit = self.settings.max_references
        if not refs:
            raise GenerationError("no reference image: give one per person (at least 1)")
        if len(refs) > limit:
            raise GenerationError(f"{len(refs)} references, but this model supports at most {limit} (the most "
                                  f"people it was trained with); give at most {limit}")
        images = [r.decode() for r in refs]
        if self.detector is not None:
            # one image per call: the detector then sees each at its own size (a batch of mixed sizes would be
            # letterboxed into 640x640, and a small reference's face scaled past what the detector finds)
            for ref, rgb in zip(refs, images):
                (found,) = self.detector.detect([rgb])
                sides = np.minimum(found.boxes[:, 2] - found.boxes[:, 0], found.boxes[:, 3] - found.boxes[:, 1])
                if not (sides >= self.settings.min_face_size).any():
                    small = f" of at least {self.settings.min_face_size:g} px" if len(found) else ""
                    raise GenerationError(f"reference {ref.name}: no face{small} found in it; each reference must "
                                          "show the face of the person it stands for")
        return [fit_signed(rgb, self.settings.generator.reference_resolution) for rgb in images]

    def generate(self, prompt: str, refs: Sequence[Reference], *, seeds: Sequence[int]) -> list[np.ndarray]:
        """len(seeds) images (H, W, 3) uint8 of `prompt` with the people of `refs`; the references are checked
        first (GenerationError)."""
        # lazy: the generator's sampling code is torch and diffusers; loaded with the model
        from umo.models import generate_images

        if not prompt or not prompt.strip():
            raise GenerationError("empty prompt")
        tensors = self.references(refs)
        height, width = self.settings.generator.resolution
        with torch.no_grad():
            return generate_images(self.model, prompt, tensors, seeds=list(seeds), steps=self.settings.steps,
                                   height=height, width=width)


def png_base64(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def base64_reference(text: str, name: str) -> Reference:
    """A reference sent as base64 text (an image file's bytes), or a GenerationError naming it."""
    try:
        return Reference(name, base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError, TypeError) as err:
        raise GenerationError(f"reference {name}: not base64 of an image file ({err})") from err


# ------------------------------------------------------------------------------------------------ the pyfunc


try:
    import mlflow.pyfunc as _pyfunc

    _PythonModel = _pyfunc.PythonModel
except ImportError:  # pragma: no cover - mlflow is a dependency of the serving environment
    _PythonModel = object


class UmoLoraModel(_PythonModel):
    """MLflow pyfunc: rows of (prompt, references, seed?) -> one generated image per row, a base64 PNG.

    references: a list of base64-encoded image files (PNG, JPEG, ...), one per person. The artifacts are the
    LoRA and the package's config.json (`ServeSettings`)."""

    def load_context(self, context) -> None:
        self.generator = LoraGenerator(ServeSettings.read(context.artifacts["config"]), context.artifacts["lora"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """A GenerationError becomes MLflow's INVALID_PARAMETER_VALUE: the scoring server answers 400 with the
        message (which reference, what is wrong), not 500."""
        # lazy: only the served model needs MLflow's error type
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        try:
            return self._predict(model_input)
        except GenerationError as err:
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from err

    def _predict(self, model_input: pd.DataFrame) -> pd.DataFrame:
        images = []
        for k, row in enumerate(model_input.to_dict("records")):
            refs = row["references"]
            if isinstance(refs, str):  # a JSON list sent as text
                try:
                    refs = json.loads(refs)
                except ValueError as err:
                    raise GenerationError(f"row {k}: references is neither a list nor a JSON list") from err
            refs = [base64_reference(text, f"{k}.{j}") for j, text in enumerate(list(refs))]
            seed = row.get("seed")
            seed = k if seed is None or seed != seed else int(seed)  # NaN when the column is partly missing
            (image,) = self.generator.generate(row["prompt"], refs, seeds=[seed])
            images.append(png_base64(image))
        return pd.DataFrame({"image": images})
