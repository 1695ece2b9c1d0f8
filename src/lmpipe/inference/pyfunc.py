"""The MLflow pyfunc around an ONNX export: what a registered lmpipe model runs inside MLflow.

`mlflow.pyfunc.load_model("models:/lmpipe@champion")` and `mlflow models serve --env-manager local` generate
with it: a DataFrame with a "prompt" column in, one completion per row out. lmpipe travels inside the model
as code (see `lmpipe.registry.log_model`), so a serving environment needs only `SERVING_REQUIREMENTS`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict
from importlib import metadata
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

from lmpipe.errors import LmpipeError
from lmpipe.inference.sampling import DEFAULTS, GenerationParams

if not sys.stderr.isatty():  # MLflow's per-file download bars would flood CI and DVC logs
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

MODEL_DIR_ARTIFACT = "model_dir"
"""Key of the ONNX export directory among the pyfunc's artifacts."""
CARD_ARTIFACT = "model_card"
"""Key of the model card (markdown) among the pyfunc's artifacts."""
SERVING_REQUIREMENTS = ("mlflow", "onnxruntime", "numpy", "pandas", "tokenizers", "jinja2")
"""What the pyfunc imports at serving time (lmpipe itself travels inside the model as code)."""
GENERATION_DEFAULTS = {
    "max_tokens": DEFAULTS.max_new_tokens,
    **{k: v for k, v in asdict(DEFAULTS).items() if k != "max_new_tokens"},
    "chat": True,
}
"""Settings of a predict call that neither its params nor its input columns set: `GenerationParams`' defaults
under the OpenAI name max_tokens, and the chat template applied."""
ROW_COLUMNS = {"max_tokens": "long", "temperature": "double", "seed": "long"}
"""Optional input columns that set a generation setting for their row only."""
OUTPUT_COLUMNS = {
    "text": "string",
    "finish_reason": "string",
    "prompt_tokens": "long",
    "completion_tokens": "long",
}
"""One completion per row."""
_PARAM_TYPES = {
    "max_tokens": "long",
    "temperature": "double",
    "top_k": "long",
    "top_p": "double",
    "seed": "long",
    "stop": "string",
    "chat": "boolean",
}


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
                out[i] = {column: getattr(c, column) for column in OUTPUT_COLUMNS}
        return pd.DataFrame(out, columns=list(OUTPUT_COLUMNS))


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
    outputs = Schema([ColSpec(dtype, name) for name, dtype in OUTPUT_COLUMNS.items()])
    params = ParamSchema(
        [
            ParamSpec(name, dtype, GENERATION_DEFAULTS[name], shape=(-1,) if name == "stop" else None)
            for name, dtype in _PARAM_TYPES.items()
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def serving_requirements() -> list[str]:
    """pip requirements of the pyfunc, pinned to the versions installed here."""
    return [f"{name}=={metadata.version(name)}" for name in SERVING_REQUIREMENTS]
