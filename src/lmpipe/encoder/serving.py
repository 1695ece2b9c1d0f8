"""The encoder classifier at serving time, with ONNX Runtime and no torch: texts in, labels and probabilities
out; and its MLflow form, the registered model `lmpipe-classifier` (its own registered model, never a version
of the generative `lmpipe`), a pyfunc returning labels and probabilities.

`OrtClassifier` reads an ONNX classifier directory (`lmpipe.encoder.onnx`, or its int8 copy from
`lmpipe.encoder.quantize`; `lmpipe.encoder.resolve` finds one from a directory or
`models:/lmpipe-classifier@champion`); `ClassifierPyfunc` wraps it;
`register_classifier` logs a directory into the active MLflow run and registers it with an alias.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from lmpipe.encoder.tokens import EncoderTokenizer
from lmpipe.errors import LmpipeError
from lmpipe.formats import ONNX_CONFIG_FILE, ONNX_FILE, TOKENIZER_FILE

CLASSIFIER_MODEL_NAME = "lmpipe-classifier"
"""The registered model of the encoder classifiers."""
ONNX_DIR_ARTIFACT = "onnx_dir"
"""Key of the ONNX classifier directory among the pyfunc's artifacts."""
MAX_TEXTS = 256
"""Most texts one call classifies (a bound on a request's work)."""


def read_classifier_config(onnx_dir: str | os.PathLike) -> dict[str, Any]:
    """config.json of the ONNX classifier directory `onnx_dir`, after checking its files are there."""
    onnx_dir = Path(onnx_dir)
    for name in (ONNX_FILE, ONNX_CONFIG_FILE, TOKENIZER_FILE):
        if not (onnx_dir / name).is_file():
            raise LmpipeError(f"missing {onnx_dir / name}: expected an ONNX encoder classifier directory")
    try:
        config = json.loads((onnx_dir / ONNX_CONFIG_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LmpipeError(f"{onnx_dir / ONNX_CONFIG_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or config.get("kind") != "encoder-classifier":
        raise LmpipeError(
            f"{onnx_dir / ONNX_CONFIG_FILE}: not an encoder classifier export (expected kind "
            f"'encoder-classifier', written by lmpipe.encoder.onnx)"
        )
    return config


class OrtClassifier:
    """An ONNX classifier directory in ONNX Runtime. Safe to call from several threads at once (the server's
    threadpool): the tokenizer, whose truncation setting each call changes, is used by one at a time."""

    def __init__(self, onnx_dir: str | os.PathLike, threads: int = 1):
        import onnxruntime as ort

        onnx_dir = Path(onnx_dir)
        self.config = read_classifier_config(onnx_dir)
        self.label_sets: dict[str, list[str]] = self.config["label_sets"]
        self.tokenizer = EncoderTokenizer.from_file(onnx_dir / TOKENIZER_FILE, self.config["pad_token"])
        self._tokenizing = threading.Lock()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(onnx_dir / ONNX_FILE), options, providers=["CPUExecutionProvider"]
        )

    def probabilities(self, texts: list[str]) -> dict[str, np.ndarray]:
        """task -> (N, n_labels) probabilities of `texts` (longer texts truncated to the trained max_length)."""
        if not isinstance(texts, list) or not texts or len(texts) > MAX_TEXTS:
            raise LmpipeError(f"texts: expected a list of 1 to {MAX_TEXTS} strings")
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise LmpipeError(f"texts[{i}]: expected a non-empty string")
        with self._tokenizing:
            rows = self.tokenizer.encode(texts, self.config["max_length"], "truncate")
        length = max(len(row) for row in rows)
        ids = np.full((len(rows), length), self.config["pad_id"], dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
        mask = (ids != self.config["pad_id"]).astype(np.int64)
        outputs = self.session.run(self.config["output_names"], {"input_ids": ids, "attention_mask": mask})
        # by output name: config.json keeps its keys sorted, so label_sets' order need not be the outputs'
        names = [name.removeprefix("probs_") for name in self.config["output_names"]]
        return dict(zip(names, outputs, strict=True))

    def classify(self, texts: list[str], task: str | None = None) -> list[dict[str, Any]]:
        """Per text, per task (or only `task`): {"label", "probability", "probabilities": {label: p}}."""
        if task is not None and task not in self.label_sets:
            raise LmpipeError(f"task {task!r}: expected one of {', '.join(self.label_sets)}")
        probs = self.probabilities(texts)
        tasks = [task] if task else list(probs)
        results = []
        for i in range(len(texts)):
            entry = {}
            for name in tasks:
                row, labels = probs[name][i], self.label_sets[name]
                best = int(row.argmax())
                entry[name] = {
                    "label": labels[best],
                    "probability": float(row[best]),
                    "probabilities": {label: float(p) for label, p in zip(labels, row, strict=True)},
                }
            results.append(entry)
        return results


def _pyfunc_class():
    import mlflow

    class ClassifierPyfunc(mlflow.pyfunc.PythonModel):
        """A DataFrame with a "text" column in; per row and task the label, its probability and all of them."""

        def load_context(self, context):
            self.classifier = OrtClassifier(context.artifacts[ONNX_DIR_ARTIFACT])

        def __getstate__(self):
            # MLflow loads the model to check the input example, then pickles it: the session (and the
            # tokenizer's lock) stay out.
            return {}

        def predict(self, context, model_input, params=None):
            import pandas as pd

            texts = [str(t) for t in model_input["text"]]
            # A batch job may send any number of rows: they are classified MAX_TEXTS at a time.
            results = [
                r
                for i in range(0, len(texts), MAX_TEXTS)
                for r in self.classifier.classify(texts[i : i + MAX_TEXTS])
            ]
            records = []
            for text, result in zip(texts, results, strict=True):
                for task, answer in result.items():
                    records.append(
                        {
                            "text": text,
                            "task": task,
                            "label": answer["label"],
                            "probability": answer["probability"],
                            "probabilities": json.dumps(answer["probabilities"]),
                        }
                    )
            return pd.DataFrame.from_records(records)

    return ClassifierPyfunc


def register_classifier(
    onnx_dir: str | os.PathLike,
    alias: str = "champion",
    model_name: str = CLASSIFIER_MODEL_NAME,
    tags: dict[str, str] | None = None,
    description: str | None = None,
):
    """Log the ONNX classifier directory into the active MLflow run as a pyfunc, register it as a new version
    of `model_name` with `tags` and `description` and point `alias` at it; returns the version."""
    import mlflow
    import pandas as pd

    import lmpipe

    if mlflow.active_run() is None:
        raise LmpipeError("register_classifier: no active MLflow run")
    info = mlflow.pyfunc.log_model(
        name="encoder-classifier",
        python_model=_pyfunc_class()(),
        artifacts={ONNX_DIR_ARTIFACT: str(onnx_dir)},
        code_paths=[str(Path(lmpipe.__file__).parent)],
        pip_requirements=["mlflow", "onnxruntime", "numpy", "pandas", "tokenizers"],
        input_example=pd.DataFrame({"text": ["Jesus wept."]}),
        registered_model_name=model_name,
    )
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    for key, value in (tags or {}).items():
        client.set_model_version_tag(model_name, version, key, value)
    if description is not None:
        client.update_model_version(model_name, version, description=description)
    client.set_registered_model_alias(model_name, alias, version)
    return version
