"""What the registry, resolver and pyfunc tests share: a tiny export and a fresh MLflow store to log it in."""

import shutil
from pathlib import Path

from tiny_models import export_tiny_model

from lmpipe import registry
from lmpipe.export import ExportConfig
from lmpipe.registry import RegisterConfig

SENTENCES = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void; and darkness was upon the face of the deep.",
] * 3


def tiny_export(root: Path) -> Path:
    """A tiny GPT (weights at std 0.3, so its output depends on the prompt) exported to <root>/onnx/tiny."""
    export_tiny_model(
        root,
        root / "onnx" / "tiny",
        ExportConfig(parity_decode_steps=1, parity_batch=1),
        sentences=SENTENCES,
        n_layer=1,
    )
    return root / "onnx" / "tiny"


def open_store(tmp_path: Path, template: Path, monkeypatch):
    """A fresh sqlite store as MLflow's current tracking and registry URI; yields (uri, experiment id) of an
    experiment whose artifacts stay in tmp_path (the store's Default experiment points elsewhere)."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # recorded as absent, so teardown removes what MLflow sets
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    shutil.copyfile(template, tmp_path / "mlruns.db")
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("registry-test", artifact_location=(tmp_path / "art").as_uri())
    yield uri, experiment
    mlflow.set_tracking_uri(None)


def evaluation(value: float) -> dict:
    """An evaluate.json with the tiny variant's gate metric at `value`."""
    return {
        "lm": {"onnx-tiny": {"test_ppl": 12.5, "parameters": 1000}, "pretrained": {"test_ppl": 11.0}},
        "tasks": {"onnx-tiny": {"book": {"f1_macro": value, "accuracy": 0.5}, "testament": {"roc_auc": 0.7}}},
        "ppl_ratio_vs_ngram": {"onnx-tiny": 1.5},
    }


def log_version(onnx_dir, store, cfg: RegisterConfig, value: float, card: str = "card"):
    """One registry.log_model of the tiny export with gate metric `value`, in its own run."""
    import mlflow

    with mlflow.start_run(experiment_id=store[1]):
        return registry.log_model(onnx_dir, cfg, registry.variant_metrics(evaluation(value), "tiny"), card)


def fake_version(client, cfg: RegisterConfig, tmp_path, value: float | None):
    """A registered version with only the tags the gate reads (no pyfunc: the gate never loads the model)."""
    if not client.search_registered_models(f"name = '{cfg.model_name}'"):
        client.create_registered_model(cfg.model_name)
    tags = {"variant": "tiny"} | ({f"metric.{cfg.metric}": repr(value)} if value is not None else {})
    return client.create_model_version(cfg.model_name, source=tmp_path.as_uri(), tags=tags)


def champion(client, name: str) -> str:
    return str(client.get_model_version_by_alias(name, "champion").version)
