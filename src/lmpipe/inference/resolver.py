"""The one model resolver: a local ONNX export directory or an MLflow registry URI -> a directory on disk.

Servers, `lmpipe generate` and the `infer` stage name a model as a directory or as `models:/<name>@<alias>` /
`models:/<name>/<version>`. A registry version is downloaded once into a cache and reused. MLflow is imported
only for registry URIs, so a local directory resolves without it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from lmpipe.atomic import atomic_path
from lmpipe.config import one_line
from lmpipe.errors import LmpipeError
from lmpipe.formats import DEFAULT_TRACKING_URI

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

REGISTRY_SCHEME = "models:/"
"""Prefix of an MLflow model registry URI (models:/<name>@<alias> or models:/<name>/<version>)."""


def default_cache_dir() -> Path:
    """Where registry models are downloaded: $XDG_CACHE_HOME/lmpipe/models, else ~/.cache/lmpipe/models."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "lmpipe" / "models"


def resolve_model(
    ref: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    tracking_uri: str | None = None,
    artifact: str | None = None,
) -> Path:
    """The ONNX export directory that `ref` names (of a registry version: the pyfunc's artifact `artifact`, by
    default the generative model's `MODEL_DIR_ARTIFACT`; `lmpipe.encoder.resolve` asks for the classifier's).

    `ref` is a local directory (returned as is), or a registry URI whose version is downloaded once into
    `cache_dir` (default `default_cache_dir()`), then reused. `tracking_uri` defaults to MLFLOW_TRACKING_URI, else
    the pipeline's own store (the one `make train` registered into, not MLflow's default `mlflow.db`). Any
    problem is a one-line LmpipeError naming `ref`.
    """
    text = os.fspath(ref)
    if not text.startswith(REGISTRY_SCHEME):
        path = Path(text)
        if not path.is_dir():
            raise LmpipeError(
                f"missing model directory {path}: build it with `dvc repro export` (and `dvc repro quantize` "
                f"for the int8 variants), or pass another ONNX export directory, models:/<name>@<alias> or "
                f"models:/<name>/<version>"
            )
        return path
    import mlflow

    from lmpipe.inference.pyfunc import MODEL_DIR_ARTIFACT  # also keeps MLflow's download bars out of logs

    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    version = _registry_version(text, tracking_uri)
    # Keyed by the version's model id too: two stores (say a test store and the real one) both have v1.
    unique = hashlib.sha256(f"{version.model_id}|{version.source}|{version.creation_timestamp}".encode())
    target = (
        Path(cache_dir or default_cache_dir()) / version.name / f"{version.version}-{unique.hexdigest()[:12]}"
    )
    if not (target / "MLmodel").is_file():
        try:
            # Some of MLflow's download paths (a version whose source is a logged model, models:/m-<id>)
            # look the name up again in the *global* registry, ignoring registry_uri: point it at this store.
            with atomic_path(target) as tmp, _global_store(mlflow, tracking_uri):
                tmp.mkdir()
                mlflow.artifacts.download_artifacts(
                    artifact_uri=f"{REGISTRY_SCHEME}{version.name}/{version.version}",
                    dst_path=str(tmp),
                    tracking_uri=tracking_uri,
                    registry_uri=tracking_uri,
                )
        except mlflow.exceptions.MlflowException as exc:
            raise LmpipeError(f"model {text!r}: download failed: {one_line(exc)}") from exc
    return _model_dir_artifact(target, text, artifact or MODEL_DIR_ARTIFACT)


@contextlib.contextmanager
def _global_store(mlflow, uri: str) -> Iterator[None]:
    """MLflow's global tracking and registry URIs set to `uri` for the duration, then put back exactly as
    they were, environment variables included (unset included: the public getters would return a resolved
    default, and setting that would outlive a later change of MLFLOW_TRACKING_URI)."""
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    before = tracking_utils._tracking_uri, registry_utils._registry_uri
    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")  # the setters export them for subprocesses
    environ = {name: os.environ.get(name) for name in names}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = before
        for name, value in environ.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _registry_version(ref: str, tracking_uri: str | None) -> ModelVersion:
    import mlflow
    from mlflow.exceptions import MlflowException

    rest = ref[len(REGISTRY_SCHEME) :]
    if "@" in rest:
        name, _, alias = rest.partition("@")
        version = None
    else:
        name, _, version = rest.rpartition("/")
        alias = None
    if not name or not (alias or (version and version.isdigit())):
        raise LmpipeError(f"model {ref!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException as exc:
        where = tracking_uri or mlflow.get_tracking_uri()
        raise LmpipeError(f"model {ref!r} not found in {where}: {one_line(exc)}") from exc


def _model_dir_artifact(local_model: Path, ref: str, key: str) -> Path:
    """Path of the ONNX directory artifact `key` inside a downloaded pyfunc model."""
    from mlflow.models import Model

    flavor = Model.load(str(local_model / "MLmodel")).flavors.get("python_function", {})
    relative = flavor.get("artifacts", {}).get(key, {}).get("path")
    if relative is None:
        raise LmpipeError(f"model {ref!r} has no {key!r} artifact: not an lmpipe ONNX model")
    return local_model / relative
