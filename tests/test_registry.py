"""lmpipe.registry against a real MLflow (a sqlite store per test) and a tiny exported ONNX model."""

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
from tiny_models import export_tiny_model

from lmpipe import registry
from lmpipe.atomic import write_json
from lmpipe.errors import LmpipeError
from lmpipe.export import ExportConfig
from lmpipe.inference.engine import OrtEngine
from lmpipe.inference.sampling import GenerationParams
from lmpipe.registry import RegisterConfig

SENTENCES = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void; and darkness was upon the face of the deep.",
] * 3
PROMPTS = ["In the beginning", "And the earth was", "God"]
METRIC = "tasks.book.f1_macro"


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    """A tiny GPT (weights at std 0.3, so its output depends on the prompt) exported to <tmp>/onnx/tiny."""
    root = tmp_path_factory.mktemp("registry")
    export_tiny_model(
        root,
        root / "onnx" / "tiny",
        ExportConfig(parity_decode_steps=1, parity_batch=1),
        sentences=SENTENCES,
        n_layer=1,
    )
    return root / "onnx" / "tiny"


@pytest.fixture
def store(tmp_path, mlflow_template_db, monkeypatch):
    """A fresh sqlite store as MLflow's current tracking and registry URI; yields (uri, experiment id) of an
    experiment whose artifacts stay in tmp_path (the store's Default experiment points elsewhere)."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # recorded as absent, so teardown removes what MLflow sets
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    shutil.copyfile(mlflow_template_db, tmp_path / "mlruns.db")
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


def test_the_gate_keeps_the_champion_against_a_worse_candidate_and_yields_to_a_better_one(onnx_dir, store):
    import mlflow

    cfg = RegisterConfig(variants=["tiny"], candidate="tiny")
    client = mlflow.MlflowClient()
    first = log_version(onnx_dir, store, cfg, 0.50)
    assert registry.promote(client, cfg, first, 0.50)["promoted"] is True
    assert champion(client, "lmpipe") == str(first.version) == "1"

    worse = log_version(onnx_dir, store, cfg, 0.40)
    with mlflow.start_run(experiment_id=store[1]) as run:
        decision = registry.promote(client, cfg, worse, 0.40)
    assert decision["promoted"] is False
    assert decision["champion_before"] == {"version": "1", "variant": "tiny", "value": 0.5}
    assert decision["candidate"] == {"version": "2", "variant": "tiny", "value": 0.4}
    assert "does not beat champion v1" in decision["reason"]
    assert champion(client, "lmpipe") == "1"
    assert str(client.get_model_version_by_alias("lmpipe", "candidate").version) == "2"
    assert client.get_model_version("lmpipe", "2").tags["gate"] == "rejected"
    logged = client.get_run(run.info.run_id)
    assert logged.data.tags["lmpipe.gate.promoted"] == "false"
    assert logged.data.tags["lmpipe.gate.champion_version"] == "1"
    path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="promotion.json")
    assert json.loads(open(path).read()) == decision

    better = log_version(onnx_dir, store, cfg, 0.55)
    decision = registry.promote(client, cfg, better, 0.55)
    assert decision["promoted"] is True and decision["champion_after"] == "3"
    assert champion(client, "lmpipe") == "3"


def test_the_gate_honours_direction_and_margin(store, tmp_path):
    import mlflow

    client = mlflow.MlflowClient()
    cfg = RegisterConfig(variants=["tiny"], candidate="tiny", metric="lm.test_ppl", higher_is_better=False)
    cfg.min_improvement = 0.5
    registry.promote(client, cfg, fake_version(client, cfg, tmp_path, 10.0), 10.0)
    # Lower is better: 9.7 is better, but not by more than the margin of 0.5.
    assert registry.promote(client, cfg, fake_version(client, cfg, tmp_path, 9.7), 9.7)["promoted"] is False
    # 10.6 is worse; 9.4 beats 10.0 by 0.6 > 0.5.
    assert registry.promote(client, cfg, fake_version(client, cfg, tmp_path, 10.6), 10.6)["promoted"] is False
    assert registry.promote(client, cfg, fake_version(client, cfg, tmp_path, 9.4), 9.4)["promoted"] is True
    assert champion(client, "lmpipe") == "4"
    # An equal metric is no improvement, even with no margin.
    cfg.min_improvement = 0.0
    assert registry.promote(client, cfg, fake_version(client, cfg, tmp_path, 9.4), 9.4)["promoted"] is False


def test_a_champion_without_the_metric_tag_stays(store, tmp_path):
    import mlflow

    client = mlflow.MlflowClient()
    cfg = RegisterConfig(variants=["tiny"], candidate="tiny")
    registry.promote(client, cfg, fake_version(client, cfg, tmp_path, None), 0.9)
    decision = registry.promote(client, cfg, fake_version(client, cfg, tmp_path, 0.9), 0.9)
    assert decision["promoted"] is False and "has no tag metric.tasks.book.f1_macro" in decision["reason"]
    with pytest.raises(LmpipeError, match="expected a finite number"):
        registry.promote(client, cfg, "2", math.nan)


def test_the_champion_generates_what_the_engine_generates(onnx_dir, store):
    import mlflow

    cfg = RegisterConfig(variants=["tiny"], candidate="tiny")
    version = log_version(onnx_dir, store, cfg, 0.5)
    registry.promote(mlflow.MlflowClient(), cfg, version, 0.5)
    model = mlflow.pyfunc.load_model("models:/lmpipe@champion")
    engine = OrtEngine(onnx_dir, threads=1)

    out = model.predict(pd.DataFrame({"prompt": PROMPTS}), params={"max_tokens": 12})
    expected = engine.generate(PROMPTS, GenerationParams(max_new_tokens=12))
    assert out["text"].tolist() == [c.text for c in expected]
    assert out["completion_tokens"].tolist() == [c.completion_tokens for c in expected]
    assert out["finish_reason"].tolist() == [c.finish_reason for c in expected]
    assert len(set(out["text"])) == len(PROMPTS)  # the outputs depend on the prompt

    # A per-row column overrides the params for its row only.
    rows = model.predict(
        pd.DataFrame({"prompt": PROMPTS[:2], "max_tokens": [3, 7]}), params={"max_tokens": 12}
    )
    assert rows["completion_tokens"].tolist() == [3, 7]
    assert rows["text"][0] == engine.generate(PROMPTS[:1], GenerationParams(max_new_tokens=3))[0].text

    sampled = dict(max_tokens=10, temperature=1.0, top_k=20, seed=4)
    again = model.predict(pd.DataFrame({"prompt": PROMPTS}), params=sampled)
    expected = engine.generate(
        PROMPTS, GenerationParams(max_new_tokens=10, temperature=1.0, top_k=20, seed=4)
    )
    assert again["text"].tolist() == [c.text for c in expected]


def test_a_version_carries_tags_card_and_signature(onnx_dir, store, tmp_path):
    import mlflow

    cfg = RegisterConfig(variants=["tiny"], candidate="tiny")
    metrics = registry.variant_metrics(evaluation(0.5), "tiny")
    card = registry.model_card(onnx_dir, metrics, {"git commit": "abc123"})
    with mlflow.start_run(experiment_id=store[1]) as run:
        version = registry.log_model(onnx_dir, cfg, metrics, card)
    assert version.tags["variant"] == "tiny" and version.tags["quantization"] == "none"
    assert int(version.tags["onnx_bytes"]) == (onnx_dir / "model.onnx").stat().st_size
    assert float(version.tags["metric.tasks.book.f1_macro"]) == 0.5
    assert float(version.tags["metric.lm.test_ppl"]) == 12.5
    assert version.description == card
    model_info = mlflow.models.get_model_info("models:/lmpipe/1")
    assert "max_tokens" in {p.name for p in model_info.signature.params.params}
    assert model_info.signature.inputs.input_names() == ["prompt", "max_tokens", "temperature", "seed"]
    local = registry.resolve_model_dir("models:/lmpipe/1", cache_dir=tmp_path / "cache")
    assert (local.parent / "model_card.md").read_text() == card
    in_run = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="model_cards/tiny")
    assert open(f"{in_run}/model_card.md").read() == card


def test_model_card_says_what_the_model_is(onnx_dir):
    card = registry.model_card(onnx_dir, {"tasks.book.f1_macro": 0.41234}, {"git commit": "abc123"})
    assert card.startswith("# tiny (lmpipe)")
    assert "| tasks.book.f1_macro | 0.4123 |" in card
    assert "| git commit | abc123 |" in card
    assert "## Data" in card and "## Limitations" in card
    assert "| context | 64 tokens |" in card
    assert "None: evaluate.json has no row 'onnx-tiny'" in registry.model_card(onnx_dir, {}, {})


def test_resolve_model_dir_by_alias_version_and_path(onnx_dir, store, tmp_path, monkeypatch):
    import mlflow

    cfg = RegisterConfig(variants=["tiny"], candidate="tiny")
    version = log_version(onnx_dir, store, cfg, 0.5)
    registry.promote(mlflow.MlflowClient(), cfg, version, 0.5)
    cache = tmp_path / "cache"
    by_alias = registry.resolve_model_dir("models:/lmpipe@champion", cache_dir=cache)
    assert by_alias.parent.parent.parent == cache / "lmpipe"
    assert sorted(p.name for p in by_alias.iterdir()) == sorted(p.name for p in onnx_dir.iterdir())
    assert (by_alias / "model.onnx").read_bytes() == (onnx_dir / "model.onnx").read_bytes()

    # The second resolution reuses the download.
    def no_download(**kwargs):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", no_download)
    assert registry.resolve_model_dir("models:/lmpipe/1", cache_dir=cache) == by_alias
    assert registry.resolve_model_dir(str(onnx_dir)) == onnx_dir
    assert registry.resolve_model_dir(onnx_dir) == onnx_dir


def test_resolve_model_dir_errors_are_one_line(store, tmp_path):
    import mlflow

    with pytest.raises(LmpipeError, match=r"model '.*nowhere': no such directory") as missing:
        registry.resolve_model_dir(tmp_path / "nowhere")
    with pytest.raises(
        LmpipeError, match=r"model 'models:/lmpipe@champion' not found in sqlite:"
    ) as no_model:
        registry.resolve_model_dir("models:/lmpipe@champion", cache_dir=tmp_path)
    client = mlflow.MlflowClient()
    cfg = RegisterConfig(variants=["tiny"], candidate="tiny")
    fake_version(client, cfg, tmp_path, 0.5)
    with pytest.raises(LmpipeError, match=r"'models:/lmpipe@champion' not found .*champion") as no_alias:
        registry.resolve_model_dir("models:/lmpipe@champion", cache_dir=tmp_path)
    with pytest.raises(LmpipeError, match=r"'models:/lmpipe/7' not found") as no_version:
        registry.resolve_model_dir("models:/lmpipe/7", cache_dir=tmp_path)
    with pytest.raises(LmpipeError, match=r"expected models:/<name>@<alias> or models:/<name>/<version>"):
        registry.resolve_model_dir("models:/lmpipe", cache_dir=tmp_path)
    for error in (missing, no_model, no_alias, no_version):
        assert "\n" not in str(error.value)


def test_metrics_are_looked_up_in_the_variants_rows():
    metrics = registry.variant_metrics(evaluation(0.5), "tiny")
    assert metrics == {
        "lm.test_ppl": 12.5,
        "lm.parameters": 1000.0,
        "tasks.book.f1_macro": 0.5,
        "tasks.book.accuracy": 0.5,
        "tasks.testament.roc_auc": 0.7,
        "ppl_ratio_vs_ngram": 1.5,
    }
    assert registry.evaluation_row("teacher-int8") == "onnx-teacher-int8"
    assert registry.lookup_metric(evaluation(0.25), "tiny", METRIC) == 0.25
    with pytest.raises(
        LmpipeError, match=r"no tasks.book.f1_macro for row 'onnx-other' \(rows of 'tasks': onnx-tiny\)"
    ):
        registry.lookup_metric(evaluation(0.25), "other", METRIC)
    with pytest.raises(LmpipeError, match="is nan: expected a finite number"):
        registry.lookup_metric(evaluation(math.nan), "tiny", METRIC)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"candidate": "nope"}, r"register.candidate='nope': expected one of register.variants"),
        ({"variants": []}, r"register.variants=\[\]: expected a non-empty list"),
        ({"variants": ["a", "a"], "candidate": "a"}, "expected each variant once"),
        ({"metric": "f1"}, "register.metric='f1': expected a dotted path"),
        ({"min_improvement": -1}, r"register.min_improvement=-1: expected a finite number >= 0"),
        ({"model_name": "a/b"}, r"register.model_name='a/b'"),
    ],
)
def test_register_config_rejects_bad_fields(kwargs, message):
    with pytest.raises(LmpipeError, match=message):
        RegisterConfig(**kwargs)


def test_log_model_needs_an_active_run(onnx_dir, tmp_path):
    with pytest.raises(LmpipeError, match="no active MLflow run"):
        registry.log_model(onnx_dir, RegisterConfig(), {}, "card")
    with pytest.raises(LmpipeError, match=r"missing .*model.onnx"):
        registry.onnx_config(tmp_path)


def test_register_stage_logs_every_variant_and_gates_the_candidate(
    onnx_dir, store, tmp_path, monkeypatch, capsys
):
    import importlib.util

    import mlflow
    from omegaconf import OmegaConf

    monkeypatch.chdir(tmp_path)  # git lookups and relative paths stay out of the repository
    spec = importlib.util.spec_from_file_location(
        "stage_register", Path(__file__).resolve().parents[1] / "pipelines" / "register.py"
    )
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    for name in ("tiny", "small"):
        shutil.copytree(onnx_dir, tmp_path / "onnx" / name)
    cfg = OmegaConf.create(
        {
            "seed": 0,
            "paths": {"metrics": str(tmp_path / "metrics"), "onnx": str(tmp_path / "onnx")},
            "register": {
                "_target_": "lmpipe.registry.RegisterConfig",
                "variants": ["tiny", "small"],
                "candidate": "tiny",
            },
            "logger": {
                "_target_": "lmpipe.tracking.TrackingConfig",
                "tracking_uri": store[0],
                "experiment_name": "register-test",
                "artifact_location": str(tmp_path / "art"),
            },
        }
    )
    client = mlflow.MlflowClient()
    # A missing input stops the stage before anything is registered.
    write_json(tmp_path / "metrics" / "evaluate.json", {"tasks": {}})
    with pytest.raises(LmpipeError, match=r"no tasks.book.f1_macro for row 'onnx-tiny'"):
        stage.main(cfg)
    assert client.search_registered_models() == []

    write_json(tmp_path / "metrics" / "evaluate.json", evaluation(0.5))
    stage.main(cfg)
    first = json.loads((tmp_path / "metrics" / "register.json").read_text())
    assert first["versions"] == {"tiny": "1", "small": "2"}
    assert first["aliases"] == {"candidate": "1", "champion": "1"} and first["decision"]["promoted"] is True
    assert "promoted to champion" in capsys.readouterr().out

    write_json(tmp_path / "metrics" / "evaluate.json", evaluation(0.3))
    stage.main(cfg)
    second = json.loads((tmp_path / "metrics" / "register.json").read_text())
    assert second["versions"] == {"tiny": "3", "small": "4"}
    assert (
        second["aliases"] == {"candidate": "3", "champion": "1"} and second["decision"]["promoted"] is False
    )
    assert "v3 (tiny) not promoted" in capsys.readouterr().out
    assert client.get_model_version("lmpipe", "4").tags["variant"] == "small"
