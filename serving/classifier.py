"""The Python API: an exported model that classifies images, without torch or a server.

    >>> from serving import Classifier
    >>> clf = Classifier.load("exported_models/default")        # or a BentoML model-store tag
    >>> clf.predict("my_cat.png", k=3)
    [{'label': 'cat', 'probability': 0.91}, {'label': 'dog', 'probability': 0.05}, ...]
    >>> clf.predict_batch([pil_image, "ship.jpg", pixels_32x32x3], k=1)

An image is a file path, the file's bytes, a Pillow image or a uint8 (H, W, 3) RGB array; each is brought to
the model's input as its manifest says (bundle.preprocess), the same way the service and the offline predictor
(`python -m serving.predict`, which uses this class) do, so all three give the same answer for the same file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from typing_extensions import TypedDict

from bundle.manifest import MANIFEST_NAME, ExportedModel, ModelError, load_model_dir, verify_checksums
from bundle.preprocess import decode_image, pixels_to_input, read_image_file, softmax, to_contract_pixels, top_k
from bundle.runtime import Runner, load_backend, resolve_backend

DEFAULT_K = 3  # labels per image unless the caller asks for another number (service, predictor, this API)
ImageInput = str | os.PathLike | bytes | Image.Image | np.ndarray


class Prediction(TypedDict):
    """One label of an answer, most probable first."""

    label: str
    probability: float


@dataclass(frozen=True)
class Classifier:
    """An exported model (validated manifest, checksummed model file) and a function that runs it."""

    model: ExportedModel
    backend: str  # the artifact that runs: onnx, onnx_int8 or torchscript (bundle.runtime)
    run: Runner  # float32 model input -> logits

    @classmethod
    def load(cls, model: str | os.PathLike | None = None, *, backend: str = "auto", threads: int = 0) -> Classifier:
        """Load an exported model folder (default: $CLASSIFIER_MODEL or exported_models/default) or a BentoML
        model-store tag such as `cifar10-classifier:latest`. `backend` auto is the INT8 model when its export
        gate passed, else fp32 ONNX; `threads` 0 uses every usable core. Raises ModelError (a bad, missing or
        tampered model) or ValueError (an unknown backend)."""
        exported = load_model_dir(_folder_of(model))
        chosen = resolve_backend(exported, backend)
        verify_checksums(exported, [chosen])
        return cls(exported, chosen, load_backend(exported, chosen, threads=threads or None))

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def class_names(self) -> list[str]:
        return self.model.class_names

    def pixels(self, image: ImageInput, *, name: str = "image") -> np.ndarray:
        """Any accepted image -> uint8 (H, W, 3) RGB pixels at the model's size (raises ImageError)."""
        if isinstance(image, np.ndarray):
            return to_contract_pixels(Image.fromarray(_checked_array(image)), self.model.contract)
        if isinstance(image, Image.Image):
            return to_contract_pixels(image, self.model.contract)
        if not isinstance(image, bytes):
            name, image = str(image), read_image_file(Path(image))
        return decode_image(image, self.model.contract, name=name)

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) pixels at the model's size -> float32 (N, classes) probabilities."""
        return softmax(self.run(pixels_to_input(pixels, self.model.contract))).astype(np.float32)

    def predict(self, image: ImageInput, k: int = DEFAULT_K) -> list[Prediction]:
        """The k most probable labels of one image, most probable first."""
        return self.predict_batch([image], k)[0]

    def predict_batch(self, images: Iterable[ImageInput], k: int = DEFAULT_K) -> list[list[Prediction]]:
        """The k most probable labels of each image, in one model call."""
        pixels = np.stack([self.pixels(image) for image in images])
        return top_k(self.probabilities(pixels), self.class_names, k)


def is_store_tag(model: str | os.PathLike) -> bool:
    """Whether `model` names a BentoML model-store tag (`name` or `name:version`) rather than a folder: nothing
    exists at that path and it holds no path separator."""
    text = str(model)
    return not Path(text).exists() and "/" not in text and os.sep not in text


def _folder_of(model: str | os.PathLike | None) -> Path | None:
    """A folder as given (load_model_dir explains what is wrong with it); a model-store tag -> its folder."""
    if model is None or not is_store_tag(model):
        return None if model is None else Path(model)
    from serving.model_store import stored_model_folder  # imports bentoml: only for tags

    try:
        return stored_model_folder(str(model))
    except ModelError as err:
        raise ModelError(f"{str(model)!r} is no exported model folder (no {MANIFEST_NAME} there), and {err}") from None


def _checked_array(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"a pixel array must be uint8 (H, W, 3) RGB; got {array.dtype} {array.shape}")
    return array
