"""The model registry: ONNX exports as versions of one registered MLflow model, and the promotion gate.

Every exported variant becomes a version of the registered model (`lmpipe` by default): the MLflow pyfunc of
`lmpipe.inference.pyfunc` around the ONNX directory. A version carries tags (variant, quantization, file size,
its evaluation metrics as `metric.<path>`) and a model card (`lmpipe.model_card`) as its description. Two
aliases say what is what: `candidate` points at the newest version of the configured variant, `champion` at
the version that serves. The gate moves `champion` only when the candidate beats it on the configured metric
by more than a margin, so a retrain that got worse never reaches production on its own.

The encoder classifier is registered apart (`log_classifier`): a version of its own registered model
(`lmpipe-classifier`), the pyfunc of `lmpipe.encoder.serving` returning labels and probabilities, never a
version of the generative model, so the generative champion and whatever serves it are untouched. Each new
classifier version takes its model's `champion` (no gate: evaluate does not score the ONNX classifier; its
tags carry the export's parity with PyTorch and, for int8, the label agreement with fp32).

Servers and batch jobs name a model as a directory or a registry URI: see `lmpipe.inference.resolver`.
MLflow is imported by the functions that talk to it, so the config schema loads without it.
"""

from __future__ import annotations

import math
import numbers
import os
import re
import tempfile
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import AfterValidator, Field

from lmpipe.config import flatten, schema
from lmpipe.encoder.serving import CLASSIFIER_MODEL_NAME
from lmpipe.errors import LmpipeError
from lmpipe.formats import CLASSIFIER_INT8_DIR, ONNX_FILE
from lmpipe.inference.onnx_dir import onnx_row, read_onnx_config

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

CANDIDATE_ALIAS = "candidate"
CHAMPION_ALIAS = "champion"
METRIC_TAG_PREFIX = "metric."
"""A version's metrics are tagged `metric.<dotted path>`, e.g. `metric.tasks.book.f1_macro`."""
DESCRIPTION_LIMIT = 5000
"""Longest model-version description the MLflow stores accept."""
CARD_FILE = "model_card.md"
"""The model card's file name, in the logged model and in the run."""


def _dotted_path(value: str) -> str:
    if "." not in value.strip("."):
        raise ValueError("a dotted path such as tasks.book.f1_macro")
    return value


def _registry_name(value: str) -> str:
    if not re.fullmatch(r"[\w.-]+", value):
        raise ValueError("letters, digits, '_', '-' or '.'")
    return value


@schema("register")
class RegisterConfig:
    model_name: Annotated[str, AfterValidator(_registry_name)] = "lmpipe"
    """Registered model name in MLflow (versions, aliases candidate/champion)."""
    variants: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] = field(
        default_factory=lambda: ["teacher", "teacher-int8", "student", "student-int8"]
    )
    """ONNX export directories under paths.onnx to log as model versions."""
    candidate: str = "teacher-int8"
    """The variant whose new version gets alias `candidate` and may become `champion`."""
    metric: Annotated[str, AfterValidator(_dotted_path)] = "tasks.book.f1_macro"
    """Gate metric: dotted path into the candidate's rows of evaluate.json (section.key...)."""
    higher_is_better: bool = True
    """Direction of the gate metric (False for perplexity-like metrics)."""
    min_improvement: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    """The candidate must beat the champion's metric by more than this to take alias `champion`."""
    classifier: str = f"models/onnx/{CLASSIFIER_INT8_DIR}"
    """ONNX encoder classifier directory registered as a new version of classifier_model_name ('' = none)."""
    classifier_model_name: Annotated[str, AfterValidator(_registry_name)] = CLASSIFIER_MODEL_NAME
    """Registered model of the encoder classifier (never model_name); each new version takes `champion`."""

    def __post_init__(self):
        if self.classifier_model_name == self.model_name:
            raise LmpipeError(
                f"register.classifier_model_name={self.classifier_model_name!r}: expected a registered model "
                f"other than register.model_name (a classifier is never a version of the generative model)"
            )
        if len(set(self.variants)) != len(self.variants):
            raise LmpipeError(f"register.variants={self.variants!r}: expected each variant once")
        if self.candidate not in self.variants:
            raise LmpipeError(
                f"register.candidate={self.candidate!r}: expected one of register.variants "
                f"({', '.join(self.variants)})"
            )


# --- evaluate.json -> a variant's metrics -----------------------------------------------------------------


def variant_metrics(evaluation: dict, variant: str) -> dict[str, float]:
    """The variant's numeric metrics from evaluate.json, flat: {"tasks.book.f1_macro": 0.41, ...}.

    Every top-level table (lm, tasks, ...) that has a row for the variant contributes that row, so the
    gate metric `tasks.book.f1_macro` is `evaluation["tasks"][row]["book"]["f1_macro"]`.
    """
    row = onnx_row(variant)
    found = {
        section: table[row]
        for section, table in evaluation.items()
        if isinstance(table, dict) and row in table
    }
    return _numeric(found)


def lookup_metric(evaluation: dict, variant: str, path: str, source: str = "evaluate.json") -> float:
    """The gate metric `path` of `variant` in evaluate.json (a finite number), or a one-line LmpipeError."""
    metrics = variant_metrics(evaluation, variant)
    if path not in metrics:
        section = path.split(".", 1)[0]
        rows = sorted(evaluation.get(section, {})) if isinstance(evaluation.get(section), dict) else []
        raise LmpipeError(
            f"{source} has no {path} for row {onnx_row(variant)!r} (rows of {section!r}: "
            f"{', '.join(rows) or 'none'}): evaluate the ONNX variant {variant!r} first"
        )
    value = metrics[path]
    if not math.isfinite(value):
        raise LmpipeError(f"{source}: {path} of {onnx_row(variant)!r} is {value}: expected a finite number")
    return value


# --- logging versions and the gate -----------------------------------------------------------------------


def log_model(model_dir: str | os.PathLike, cfg: RegisterConfig, metrics: dict, card: str) -> ModelVersion:
    """Log the ONNX export `model_dir` as a pyfunc into the active run and register it as a new version of
    `cfg.model_name`, tagged with its variant, quantization, file size and `metrics`, with `card` as its
    description (and as artifact CARD_FILE, in the model and in the run)."""
    import mlflow
    import pandas as pd

    import lmpipe
    from lmpipe.inference.pyfunc import (
        CARD_ARTIFACT,
        MODEL_DIR_ARTIFACT,
        OnnxGenerator,
        serving_requirements,
        signature,
    )

    if mlflow.active_run() is None:
        raise LmpipeError("registry.log_model: no active MLflow run (call it inside tracking.stage_run)")
    model_dir = Path(model_dir)
    onnx = read_onnx_config(model_dir)
    numeric = _numeric(metrics)
    with tempfile.TemporaryDirectory(prefix="lmpipe-card-") as tmp:
        card_path = Path(tmp) / CARD_FILE
        card_path.write_text(card, encoding="utf-8")
        info = mlflow.pyfunc.log_model(
            name=f"onnx-{model_dir.name}",
            python_model=OnnxGenerator(),
            artifacts={MODEL_DIR_ARTIFACT: str(model_dir), CARD_ARTIFACT: str(card_path)},
            # lmpipe travels inside the model, so a serving environment needs only the requirements below.
            code_paths=[str(Path(lmpipe.__file__).parent)],
            pip_requirements=serving_requirements(),
            signature=signature(),
            # Short, so that MLflow's check of the example fits any model's context and takes no time.
            input_example=(pd.DataFrame({"prompt": ["In the beginning"]}), {"max_tokens": 4}),
            registered_model_name=cfg.model_name,
        )
        mlflow.log_artifact(str(card_path), f"model_cards/{model_dir.name}")
    if numeric:
        mlflow.log_metrics(numeric, model_id=info.model_id)
    client = mlflow.MlflowClient()
    version = str(info.registered_model_version)
    tags = {
        "variant": model_dir.name,
        "quantization": str(onnx.get("quantization", "none")),
        "onnx_bytes": str((model_dir / ONNX_FILE).stat().st_size),
        **{f"{METRIC_TAG_PREFIX}{k}": repr(v) for k, v in numeric.items()},
    }
    for key, value in tags.items():
        client.set_model_version_tag(cfg.model_name, version, key, value)
    client.update_model_version(cfg.model_name, version, description=_description(card))
    return client.get_model_version(cfg.model_name, version)


def log_classifier(onnx_dir: str | os.PathLike, cfg: RegisterConfig, provenance: dict[str, str]) -> dict:
    """Register the ONNX encoder classifier `onnx_dir` as a new version of `cfg.classifier_model_name` (the
    pyfunc of `lmpipe.encoder.serving`) and point `champion` at it; tagged with its directory, quantization,
    file size, export parity and int8 label agreement, described by a short card. Returns the version and the
    model's aliases."""
    import mlflow

    from lmpipe.encoder.serving import read_classifier_config, register_classifier

    onnx_dir = Path(onnx_dir)
    config = read_classifier_config(onnx_dir)
    checks = {"parity": config.get("parity", {}), "agreement": config.get("agreement", {})}
    tasks = [name.removeprefix("probs_") for name in config["output_names"]]  # the answers' order
    tags = {
        "variant": onnx_dir.name,
        "quantization": str(config.get("quantization", "none")),
        "onnx_bytes": str((onnx_dir / ONNX_FILE).stat().st_size),
        "tasks": ",".join(tasks),
        **{f"{METRIC_TAG_PREFIX}{k}": repr(v) for k, v in _numeric(checks).items()},
    }
    labels = ", ".join(f"{task} ({len(config['label_sets'][task])} labels)" for task in tasks)
    card = (
        f"# Encoder classifier {onnx_dir.name}\n\nTasks: {labels}. ONNX ({tags['quantization']}); "
        f"texts longer than {config['max_length']} tokens are truncated. Returns per text and task the "
        "label, its probability and every label's probability.\n\n"
        + "".join(f"- {key}: {value}\n" for key, value in provenance.items())
    )
    version = register_classifier(
        onnx_dir, CHAMPION_ALIAS, cfg.classifier_model_name, tags=tags, description=_description(card)
    )
    aliases = mlflow.MlflowClient().get_registered_model(cfg.classifier_model_name).aliases
    return {
        "model_name": cfg.classifier_model_name,
        "version": version,
        "aliases": {alias: str(v) for alias, v in aliases.items()},
    }


def _description(card: str) -> str:
    """The card as a version description, cut to what the store accepts (the artifact keeps it whole)."""
    if len(card) <= DESCRIPTION_LIMIT:
        return card
    note = f"\n\n(cut: the whole card is the model's artifact {CARD_FILE})\n"
    return card[: DESCRIPTION_LIMIT - len(note)] + note


def promote(
    client: MlflowClient, cfg: RegisterConfig, candidate_version: ModelVersion | str, candidate_metric: float
) -> dict[str, Any]:
    """Point alias `candidate` at the version; move `champion` to it if there is no champion or it beats the
    champion's `cfg.metric` (read from the champion's tag) by more than `cfg.min_improvement` in the
    configured direction. Returns the decision, also logged to the active run (tags, promotion.json)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    version = str(getattr(candidate_version, "version", candidate_version))
    if not isinstance(candidate_metric, numbers.Real) or not math.isfinite(candidate_metric):
        raise LmpipeError(f"{cfg.metric}={candidate_metric!r} of the candidate: expected a finite number")
    candidate = _describe(client.get_model_version(cfg.model_name, version), cfg.metric)
    candidate["value"] = float(candidate_metric)
    client.set_registered_model_alias(cfg.model_name, CANDIDATE_ALIAS, version)
    try:
        champion = _describe(client.get_model_version_by_alias(cfg.model_name, CHAMPION_ALIAS), cfg.metric)
    except MlflowException:
        champion = None
    name = f"{cfg.metric} {candidate['value']:.4g} of v{version}"
    if champion is None:
        promoted, reason = True, f"no champion yet: v{version} becomes the first"
    elif champion["version"] == version:
        promoted, reason = False, f"v{version} is already the champion"
    elif champion["value"] is None:
        promoted = False
        reason = (
            f"champion v{champion['version']} has no tag {METRIC_TAG_PREFIX}{cfg.metric} to compare with: "
            f"champion stays (move the alias by hand if the metric changed)"
        )
    else:
        gain = candidate["value"] - champion["value"]
        gain = gain if cfg.higher_is_better else -gain
        promoted = gain > cfg.min_improvement
        direction = "higher" if cfg.higher_is_better else "lower"
        verdict = "beats" if promoted else "does not beat"
        reason = (
            f"{name} {verdict} champion v{champion['version']}'s {champion['value']:.4g} "
            f"({direction} is better) by more than min_improvement={cfg.min_improvement:g}"
            + ("" if promoted else ": champion stays")
        )
    if promoted:
        client.set_registered_model_alias(cfg.model_name, CHAMPION_ALIAS, version)
    client.set_model_version_tag(cfg.model_name, version, "gate", "promoted" if promoted else "rejected")
    decision = {
        "promoted": promoted,
        "metric": cfg.metric,
        "higher_is_better": cfg.higher_is_better,
        "min_improvement": cfg.min_improvement,
        "candidate": candidate,
        "champion_before": champion,
        "champion_after": version if promoted else (champion or {}).get("version"),
        "reason": reason,
    }
    if mlflow.active_run() is not None:
        mlflow.set_tags(
            {
                "lmpipe.gate.promoted": str(promoted).lower(),
                "lmpipe.gate.candidate_version": version,
                "lmpipe.gate.champion_version": str(decision["champion_after"]),
                "lmpipe.gate.reason": reason,
            }
        )
        mlflow.log_dict(decision, "promotion.json")
    return decision


def _describe(version: ModelVersion, metric: str) -> dict[str, Any]:
    """version, variant and gate-metric value (None when the version has no such tag) of a model version."""
    value = version.tags.get(f"{METRIC_TAG_PREFIX}{metric}")
    return {
        "version": str(version.version),
        "variant": version.tags.get("variant"),
        "value": float(value) if value is not None else None,
    }


def _numeric(metrics: dict) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in flatten(metrics).items()
        if isinstance(v, numbers.Real) and not isinstance(v, bool)
    }
