"""The model registry: ONNX exports as versions of one registered MLflow model, and the promotion gate.

Every exported variant becomes a version of the registered model (`lmpipe` by default): an MLflow pyfunc
around the ONNX directory, so `mlflow.pyfunc.load_model` and `mlflow models serve --env-manager local`
generate with it. A version carries tags (variant, quantization, file size, its evaluation metrics as
`metric.<path>`) and a model card as its description. Two aliases say what is what: `candidate` points at the
newest version of the configured variant, `champion` at the version that serves. The gate moves `champion`
only when the candidate beats it on the configured metric by more than a margin, so a retrain that got worse
never reaches production on its own.

Servers and batch jobs name a model as a local directory or a registry URI (`models:/lmpipe@champion`,
`models:/lmpipe/3`); `resolve_model_dir` turns either into an ONNX directory on disk.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

import lmpipe
from lmpipe.atomic import atomic_path
from lmpipe.errors import LmpipeError

if not sys.stderr.isatty():  # MLflow's per-file download bars would flood CI and DVC logs
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

MODEL_DIR_ARTIFACT = "model_dir"
"""Key of the ONNX export directory among the pyfunc's artifacts."""
CARD_ARTIFACT = "model_card"
"""Key of the model card (markdown) among the pyfunc's artifacts."""
CANDIDATE_ALIAS = "candidate"
CHAMPION_ALIAS = "champion"
METRIC_TAG_PREFIX = "metric."
"""A version's metrics are tagged `metric.<dotted path>`, e.g. `metric.tasks.book.f1_macro`."""
DESCRIPTION_LIMIT = 5000
"""Longest model-version description the MLflow stores accept."""
SERVING_REQUIREMENTS = ("mlflow", "onnxruntime", "numpy", "pandas", "tokenizers", "jinja2")
"""What the pyfunc imports at serving time (lmpipe itself travels inside the model as code)."""
GENERATION_DEFAULTS = {
    "max_tokens": 64,
    "temperature": 0.0,
    "top_k": 0,
    "top_p": 1.0,
    "seed": None,
    "stop": [],
    "chat": True,
}
"""Generation settings of a predict call that neither its params nor its input columns set."""
ROW_COLUMNS = {"max_tokens": "long", "temperature": "double", "seed": "long"}
"""Optional input columns that set a generation setting for their row only."""


@dataclass
class RegisterConfig:
    model_name: str = "lmpipe"
    """Registered model name in MLflow (versions, aliases candidate/champion)."""
    variants: list[str] = field(
        default_factory=lambda: ["teacher", "teacher-int8", "student", "student-int8"]
    )
    """ONNX export directories under paths.onnx to log as model versions."""
    candidate: str = "teacher-int8"
    """The variant whose new version gets alias `candidate` and may become `champion`."""
    metric: str = "tasks.book.f1_macro"
    """Gate metric: dotted path into the candidate's rows of evaluate.json (section.key...)."""
    higher_is_better: bool = True
    """Direction of the gate metric (False for perplexity-like metrics)."""
    min_improvement: float = 0.0
    """The candidate must beat the champion's metric by more than this to take alias `champion`."""

    def __post_init__(self):
        if not isinstance(self.model_name, str) or not re.fullmatch(r"[\w.-]+", self.model_name):
            raise LmpipeError(
                f"register.model_name={self.model_name!r}: expected letters, digits, '_', '-' or '.'"
            )
        if (
            isinstance(self.variants, str)
            or not self.variants
            or not all(isinstance(v, str) and v for v in self.variants)
        ):
            raise LmpipeError(f"register.variants={self.variants!r}: expected a non-empty list of names")
        if len(set(self.variants)) != len(self.variants):
            raise LmpipeError(f"register.variants={self.variants!r}: expected each variant once")
        if self.candidate not in self.variants:
            raise LmpipeError(
                f"register.candidate={self.candidate!r}: expected one of register.variants "
                f"({', '.join(self.variants)})"
            )
        if not isinstance(self.metric, str) or "." not in self.metric.strip("."):
            raise LmpipeError(
                f"register.metric={self.metric!r}: expected a dotted path such as tasks.book.f1_macro"
            )
        if (
            isinstance(self.min_improvement, bool)
            or not isinstance(self.min_improvement, int | float)
            or not 0 <= self.min_improvement < math.inf
        ):
            raise LmpipeError(
                f"register.min_improvement={self.min_improvement!r}: expected a finite number >= 0"
            )


# --- evaluate.json -> a variant's metrics -----------------------------------------------------------------


def evaluation_row(variant: str) -> str:
    """Row name of an ONNX export directory in evaluate.json's tables (`onnx-<directory name>`)."""
    return f"onnx-{variant}"


def variant_metrics(evaluation: dict, variant: str) -> dict[str, float]:
    """The variant's numeric metrics from evaluate.json, flat: {"tasks.book.f1_macro": 0.41, ...}.

    Every top-level table (lm, tasks, ...) that has a row for the variant contributes that row, so the
    gate metric `tasks.book.f1_macro` is `evaluation["tasks"][row]["book"]["f1_macro"]`.
    """
    from lmpipe.config import flatten

    row = evaluation_row(variant)
    found = {
        section: table[row]
        for section, table in evaluation.items()
        if isinstance(table, dict) and row in table
    }
    return {
        key: float(value)
        for key, value in flatten(found).items()
        if isinstance(value, numbers.Real) and not isinstance(value, bool)
    }


def lookup_metric(evaluation: dict, variant: str, path: str, source: str = "evaluate.json") -> float:
    """The gate metric `path` of `variant` in evaluate.json (a finite number), or a one-line LmpipeError."""
    metrics = variant_metrics(evaluation, variant)
    if path not in metrics:
        section = path.split(".", 1)[0]
        rows = sorted(evaluation.get(section, {})) if isinstance(evaluation.get(section), dict) else []
        raise LmpipeError(
            f"{source} has no {path} for row {evaluation_row(variant)!r} (rows of {section!r}: "
            f"{', '.join(rows) or 'none'}): evaluate the ONNX variant {variant!r} first"
        )
    value = metrics[path]
    if not math.isfinite(value):
        raise LmpipeError(
            f"{source}: {path} of {evaluation_row(variant)!r} is {value}: expected a finite number"
        )
    return value


# --- the pyfunc ------------------------------------------------------------------------------------------


class OnnxGenerator(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc over an ONNX export: a DataFrame with a "prompt" column in, one completion per row out.

    Generation settings come from `params` (max_tokens, temperature, top_k, top_p, seed, stop, chat), and
    optional input columns max_tokens / temperature / seed override them for their row. `model_config`
    {"threads": n} sets ONNX Runtime's intra-op threads (0 = its default).
    """

    def load_context(self, context):
        from lmpipe.inference.engine import OrtEngine

        threads = int((context.model_config or {}).get("threads", 0))
        self._engine = OrtEngine(context.artifacts[MODEL_DIR_ARTIFACT], threads=threads)

    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        from lmpipe.inference.sampling import GenerationParams

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "prompt" not in frame.columns:
            raise LmpipeError(f"model input columns {list(frame.columns)}: expected a 'prompt' column")
        settings = {**GENERATION_DEFAULTS, **{k: v for k, v in (params or {}).items() if v is not None}}
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(frame.itertuples(index=False)):
            own = dict(settings)
            for column in ROW_COLUMNS:
                value = getattr(row, column, None) if column in frame.columns else None
                if value is not None and not pd.isna(value):
                    own[column] = value
            groups.setdefault(_settings_key(own), []).append(i)
        prompts = frame["prompt"].tolist()
        out: list[dict[str, Any]] = [{}] * len(prompts)
        for key, rows in groups.items():
            own = dict(key)
            generation = GenerationParams(
                max_new_tokens=int(own["max_tokens"]),
                temperature=float(own["temperature"]),
                top_k=int(own["top_k"]),
                top_p=float(own["top_p"]),
                stop=list(own["stop"]),
                seed=None if own["seed"] is None else int(own["seed"]),
            )
            completions = self._engine.generate(
                [prompts[i] for i in rows], generation, chat=bool(own["chat"])
            )
            for i, c in zip(rows, completions, strict=True):
                out[i] = {
                    "text": c.text,
                    "finish_reason": c.finish_reason,
                    "prompt_tokens": c.prompt_tokens,
                    "completion_tokens": c.completion_tokens,
                }
        return pd.DataFrame(out, columns=["text", "finish_reason", "prompt_tokens", "completion_tokens"])


def _settings_key(settings: dict[str, Any]) -> tuple:
    """A hashable form of one row's settings: rows with equal settings generate together in one batch."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list | tuple) else v) for k, v in settings.items()))


def signature() -> ModelSignature:
    """Input: prompt (+ optional per-row max_tokens, temperature, seed); output: the completion; and the
    params `mlflow models serve` accepts beside the input."""
    inputs = Schema(
        [ColSpec("string", "prompt")]
        + [ColSpec(dtype, name, required=False) for name, dtype in ROW_COLUMNS.items()]
    )
    outputs = Schema(
        [
            ColSpec("string", "text"),
            ColSpec("string", "finish_reason"),
            ColSpec("long", "prompt_tokens"),
            ColSpec("long", "completion_tokens"),
        ]
    )
    params = ParamSchema(
        [
            ParamSpec("max_tokens", "long", GENERATION_DEFAULTS["max_tokens"]),
            ParamSpec("temperature", "double", GENERATION_DEFAULTS["temperature"]),
            ParamSpec("top_k", "long", GENERATION_DEFAULTS["top_k"]),
            ParamSpec("top_p", "double", GENERATION_DEFAULTS["top_p"]),
            ParamSpec("seed", "long", GENERATION_DEFAULTS["seed"]),
            ParamSpec("stop", "string", GENERATION_DEFAULTS["stop"], shape=(-1,)),
            ParamSpec("chat", "boolean", GENERATION_DEFAULTS["chat"]),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def serving_requirements() -> list[str]:
    """pip requirements of the pyfunc, pinned to the versions installed here."""
    return [f"{name}=={metadata.version(name)}" for name in SERVING_REQUIREMENTS]


# --- logging versions and the gate -----------------------------------------------------------------------


def onnx_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """config.json of an ONNX export directory (LmpipeError naming the file when it is missing or broken)."""
    from lmpipe.inference.engine import CONFIG_FILE, ONNX_FILE

    model_dir = Path(model_dir)
    for path in (model_dir / ONNX_FILE, model_dir / CONFIG_FILE):
        if not path.is_file():
            raise LmpipeError(f"missing {path}: expected an ONNX export directory (stages export, quantize)")
    try:
        return json.loads((model_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LmpipeError(f"{model_dir / CONFIG_FILE} is not valid JSON: {exc}") from exc


def model_card(model_dir: str | os.PathLike, metrics: dict[str, float], provenance: dict[str, str]) -> str:
    """A markdown model card for an ONNX export: what it is, its data, its metrics and its limitations."""
    from lmpipe.inference.engine import ONNX_FILE

    model_dir = Path(model_dir)
    cfg = onnx_config(model_dir)
    shape = cfg.get("model", {})
    quantization = cfg.get("quantization", "none")
    facts = {
        "variant": model_dir.name,
        "format": f"ONNX (opset {cfg.get('opset', '?')}), KV cache, ONNX Runtime on CPU",
        "quantization": quantization,
        "layers x heads x width": f"{cfg['n_layer']} x {cfg['n_head']} x {shape.get('n_embd', '?')}",
        "context": f"{cfg['block_size']} tokens",
        "vocabulary": f"{cfg['vocab_size']} tokens",
        "position encoding": shape.get("pos_encoding", "?"),
        "model.onnx": f"{(model_dir / ONNX_FILE).stat().st_size / 1e6:.2f} MB",
        **provenance,
    }
    lines = [
        f"# {model_dir.name} (lmpipe)",
        "",
        "A small GPT-style language model, pretrained on the pipeline's text corpus and fine-tuned to follow",
        "chat-formatted instructions (students are distilled from the fine-tuned teacher), exported to ONNX.",
        "Serve it with `mlflow models serve` or lmpipe's ONNX Runtime engine; prompts go through the chat",
        "template stored beside the tokenizer.",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in facts.items()),
        "",
        "## Data",
        "",
        "Pretraining text from the `prepare` stage (params.yaml `data`, by default the King James Bible),",
        "split by whole documents; fine-tuning on the `instructions` stage's tasks (testament, book,",
        "continuation) built from the training documents only. The metrics below are on the held-out test",
        "documents. dvc.lock at the commit above pins every input.",
        "",
        "## Metrics (held-out test split, `evaluate` stage)",
        "",
    ]
    if metrics:
        lines += [
            "| metric | value |",
            "|---|---|",
            *(f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items())),
        ]
    else:
        lines.append(f"None: evaluate.json has no row {evaluation_row(model_dir.name)!r}.")
    lines += [
        "",
        "## Limitations",
        "",
        "- Tiny and trained on one corpus: it imitates that text and knows nothing beyond it (no facts).",
        "- Tuned only for the tasks above; other instructions get fluent-looking but unreliable answers.",
        f"- Prompt plus generated tokens must fit in {cfg['block_size']} tokens.",
        "- Dynamic int8 quantization can change some greedy tokens compared with the fp32 export."
        if quantization not in ("none", "", None)
        else "- fp32 weights; the int8 variants are smaller and faster but may differ slightly.",
        "- No safety filtering: outputs are raw model text.",
    ]
    return "\n".join(lines) + "\n"


def log_model(model_dir: str | os.PathLike, cfg: RegisterConfig, metrics: dict, card: str) -> ModelVersion:
    """Log the ONNX export `model_dir` as a pyfunc into the active run and register it as a new version of
    `cfg.model_name`, tagged with its variant, quantization, file size and `metrics`, with `card` as its
    description (and as artifact `model_card.md`, in the model and in the run)."""
    from mlflow import MlflowClient

    from lmpipe.inference.engine import ONNX_FILE

    if mlflow.active_run() is None:
        raise LmpipeError("registry.log_model: no active MLflow run (call it inside tracking.stage_run)")
    model_dir = Path(model_dir)
    onnx = onnx_config(model_dir)
    numeric = _numeric(metrics)
    with tempfile.TemporaryDirectory(prefix="lmpipe-card-") as tmp:
        card_path = Path(tmp) / "model_card.md"
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
    client = MlflowClient()
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


def _numeric(metrics: dict) -> dict[str, float]:
    from lmpipe.config import flatten

    return {
        k: float(v)
        for k, v in flatten(metrics).items()
        if isinstance(v, numbers.Real) and not isinstance(v, bool)
    }


def _description(card: str) -> str:
    """The card as a version description, cut to what the store accepts (the artifact keeps it whole)."""
    if len(card) <= DESCRIPTION_LIMIT:
        return card
    note = "\n\n(cut: the whole card is the model's artifact model_card.md)\n"
    return card[: DESCRIPTION_LIMIT - len(note)] + note


def promote(
    client: MlflowClient, cfg: RegisterConfig, candidate_version: ModelVersion | str, candidate_metric: float
) -> dict[str, Any]:
    """Point alias `candidate` at the version; move `champion` to it if there is no champion or it beats the
    champion's `cfg.metric` (read from the champion's tag) by more than `cfg.min_improvement` in the
    configured direction. Returns the decision, also logged to the active run (tags, promotion.json)."""
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


# --- a model reference -> an ONNX directory on disk -------------------------------------------------------


def default_cache_dir() -> Path:
    """Where registry models are downloaded: $XDG_CACHE_HOME/lmpipe/models, else ~/.cache/lmpipe/models."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "lmpipe" / "models"


def resolve_model_dir(
    ref: str | os.PathLike, cache_dir: str | os.PathLike | None = None, tracking_uri: str | None = None
) -> Path:
    """The ONNX export directory that `ref` names.

    `ref` is a local directory (returned as is), or a registry URI `models:/<name>@<alias>` or
    `models:/<name>/<version>` whose version is downloaded once into `cache_dir` (default
    `default_cache_dir()`), then reused. `tracking_uri` defaults to MLflow's current one
    (MLFLOW_TRACKING_URI). Any problem is a one-line LmpipeError naming `ref`.
    """
    text = os.fspath(ref)
    if not text.startswith("models:/"):
        path = Path(text)
        if not path.is_dir():
            raise LmpipeError(
                f"model {text!r}: no such directory (expected an ONNX export directory, "
                "models:/<name>@<alias> or models:/<name>/<version>)"
            )
        return path
    version = _registry_version(text, tracking_uri)
    # Keyed by the version's model id too: two stores (say a test store and the real one) both have v1.
    unique = hashlib.sha256(f"{version.model_id}|{version.source}|{version.creation_timestamp}".encode())
    target = (
        Path(cache_dir or default_cache_dir()) / version.name / f"{version.version}-{unique.hexdigest()[:12]}"
    )
    if not (target / "MLmodel").is_file():
        try:
            with atomic_path(target) as tmp:
                tmp.mkdir()
                mlflow.artifacts.download_artifacts(
                    artifact_uri=f"models:/{version.name}/{version.version}",
                    dst_path=str(tmp),
                    tracking_uri=tracking_uri,
                    registry_uri=tracking_uri,
                )
        except mlflow.exceptions.MlflowException as exc:
            raise LmpipeError(f"model {text!r}: download failed: {_one_line(exc)}") from exc
    return _model_dir_artifact(target, text)


def _registry_version(ref: str, tracking_uri: str | None) -> ModelVersion:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    rest = ref[len("models:/") :]
    if "@" in rest:
        name, _, alias = rest.partition("@")
        version = None
    else:
        name, _, version = rest.rpartition("/")
        alias = None
    if not name or not (alias or (version and version.isdigit())):
        raise LmpipeError(f"model {ref!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException as exc:
        where = tracking_uri or mlflow.get_tracking_uri()
        raise LmpipeError(f"model {ref!r} not found in {where}: {_one_line(exc)}") from exc


def _model_dir_artifact(local_model: Path, ref: str) -> Path:
    """Path of the "model_dir" artifact inside a downloaded pyfunc model."""
    from mlflow.models import Model

    flavor = Model.load(str(local_model / "MLmodel")).flavors.get("python_function", {})
    relative = flavor.get("artifacts", {}).get(MODEL_DIR_ARTIFACT, {}).get("path")
    if relative is None:
        raise LmpipeError(f"model {ref!r} has no {MODEL_DIR_ARTIFACT!r} artifact: not an lmpipe ONNX model")
    return local_model / relative


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
