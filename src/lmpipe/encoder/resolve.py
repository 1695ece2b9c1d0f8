"""Which encoder classifier `lmpipe classify` and `lmpipe serve --classifier` load: a directory or a registry
URI -> an ONNX classifier directory on disk, through the one model resolver (`lmpipe.inference.resolver`).

A module of its own so that neither the stages that read classifiers (quantize, register) nor those that
resolve the generative model (infer) depend on the other's code.
"""

from __future__ import annotations

import os
from pathlib import Path

from lmpipe.encoder.serving import CLASSIFIER_MODEL_NAME, ONNX_DIR_ARTIFACT
from lmpipe.errors import LmpipeError
from lmpipe.formats import ENCODER_ONNX_DIR, ONNX_FILE
from lmpipe.inference.resolver import REGISTRY_SCHEME, resolve_model


def resolve_classifier(
    ref: str | os.PathLike, cache_dir: str | os.PathLike | None = None, tracking_uri: str | None = None
) -> Path:
    """The ONNX classifier directory that `ref` names: a directory (an encoder_finetune directory stands for
    its onnx/ export), or a registry URI of the classifier's registered model
    (models:/lmpipe-classifier@champion), downloaded once into the cache as `resolve_model` does."""
    text = os.fspath(ref)
    if text.startswith(REGISTRY_SCHEME):
        return resolve_model(text, cache_dir, tracking_uri, artifact=ONNX_DIR_ARTIFACT)
    path = Path(text)
    if not (path / ONNX_FILE).is_file() and (path / ENCODER_ONNX_DIR / ONNX_FILE).is_file():
        return path / ENCODER_ONNX_DIR
    if not path.is_dir():
        raise LmpipeError(
            f"missing classifier directory {path}: build it with `dvc repro quantize` (the int8 classifier) "
            f"or `dvc repro encoder_finetune` (models/encoder/onnx), or pass another ONNX classifier "
            f"directory or models:/{CLASSIFIER_MODEL_NAME}@champion"
        )
    return path
