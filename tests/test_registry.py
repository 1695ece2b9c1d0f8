"""lmpipe.registry against a real MLflow (a sqlite store per test) and a tiny exported ONNX model."""

import json
import math
import shutil
from pathlib import Path

import pytest
from registry_store import champion, evaluation, fake_version, log_version, open_store, tiny_export

from lmpipe import registry
from lmpipe.atomic import write_json
from lmpipe.errors import LmpipeError
from lmpipe.inference.resolver import resolve_model
from lmpipe.model_card import model_card
from lmpipe.registry import RegisterConfig

PROMPTS = ["In the beginning", "And the earth was", "God"]
METRIC = "tasks.book.f1_macro"


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    return tiny_export(tmp_path_factory.mktemp("registry"))


@pytest.fixture
def store(tmp_path, mlflow_template_db, monkeypatch):
    yield from open_store(tmp_path, mlflow_template_db, monkeypatch)


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


def test_a_version_carries_tags_card_and_signature(onnx_dir, store, tmp_path):
    import mlflow

    cfg = RegisterConfig(variants=["tiny"], candidate="tiny")
    metrics = registry.variant_metrics(evaluation(0.5), "tiny")
    card = model_card(onnx_dir, metrics, {"git commit": "abc123"})
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
    local = resolve_model("models:/lmpipe/1", cache_dir=tmp_path / "cache")
    assert (local.parent / "model_card.md").read_text() == card
    in_run = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="model_cards/tiny")
    assert open(f"{in_run}/model_card.md").read() == card


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
        ({"variants": []}, r"register.variants=\[\]: expected List should have at least 1 item"),
        ({"variants": ["a", "a"], "candidate": "a"}, "expected each variant once"),
        ({"metric": "f1"}, "register.metric='f1': expected a dotted path"),
        (
            {"min_improvement": -1},
            r"register.min_improvement=-1: expected a value greater than or equal to 0",
        ),
        ({"min_improvement": float("inf")}, r"register.min_improvement=inf: expected a finite number"),
        ({"model_name": "a/b"}, r"register.model_name='a/b': expected letters, digits"),
        (
            {"classifier_model_name": "lmpipe"},
            r"register.classifier_model_name='lmpipe': expected a registered model other than",
        ),
    ],
)
def test_register_config_rejects_bad_fields(kwargs, message):
    with pytest.raises(LmpipeError, match=message):
        RegisterConfig(**kwargs)


def test_log_model_needs_an_active_run(onnx_dir, tmp_path):
    with pytest.raises(LmpipeError, match="no active MLflow run"):
        registry.log_model(onnx_dir, RegisterConfig(), {}, "card")


def test_register_stage_logs_every_variant_and_gates_the_candidate(
    onnx_dir, onnx_classifier, store, tmp_path, monkeypatch, capsys
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
    classifier = tmp_path / "onnx" / "classifier-int8"
    cfg = OmegaConf.create(
        {
            "seed": 0,
            "paths": {"metrics": str(tmp_path / "metrics"), "onnx": str(tmp_path / "onnx")},
            "data": {"_target_": "lmpipe.data.corpus.DataConfig", "source": "pydoc"},
            "register": {
                "_target_": "lmpipe.registry.RegisterConfig",
                "variants": ["tiny", "small"],
                "candidate": "tiny",
                "classifier": str(classifier),
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
    write_json(tmp_path / "metrics" / "evaluate.json", evaluation(0.5))
    with pytest.raises(LmpipeError, match=r"missing .*classifier-int8/model.onnx: expected an ONNX encoder"):
        stage.main(cfg)
    shutil.copytree(onnx_classifier[1], classifier)
    write_json(tmp_path / "metrics" / "evaluate.json", {"tasks": {}})
    with pytest.raises(LmpipeError, match=r"no tasks.book.f1_macro for row 'onnx-tiny'"):
        stage.main(cfg)
    assert client.search_registered_models() == []

    write_json(tmp_path / "metrics" / "evaluate.json", evaluation(0.5))
    stage.main(cfg)
    first = json.loads((tmp_path / "metrics" / "register.json").read_text())
    assert first["versions"] == {"tiny": "1", "small": "2"}
    assert first["aliases"] == {"candidate": "1", "champion": "1"} and first["decision"]["promoted"] is True
    # The classifier is a version of its own registered model, never of the generative one.
    expected = {"model_name": "lmpipe-classifier", "version": "1", "aliases": {"champion": "1"}}
    assert first["classifier"] == expected
    out = capsys.readouterr().out
    assert "promoted to champion" in out and "lmpipe-classifier v1 is the champion" in out
    tags = client.get_model_version("lmpipe-classifier", "1").tags
    assert tags["variant"] == "classifier-int8" and tags["tasks"] == "testament,book"
    assert float(tags["metric.parity.max_abs_prob_diff"]) < 1e-5

    write_json(tmp_path / "metrics" / "evaluate.json", evaluation(0.3))
    stage.main(cfg)
    second = json.loads((tmp_path / "metrics" / "register.json").read_text())
    assert second["versions"] == {"tiny": "3", "small": "4"}
    assert (
        second["aliases"] == {"candidate": "3", "champion": "1"} and second["decision"]["promoted"] is False
    )
    assert "v3 (tiny) not promoted" in capsys.readouterr().out
    assert second["classifier"]["version"] == "2" and second["classifier"]["aliases"] == {"champion": "2"}
    assert sorted(m.name for m in client.search_registered_models()) == ["lmpipe", "lmpipe-classifier"]
    assert client.get_model_version("lmpipe", "4").tags["variant"] == "small"
    # The card describes the corpus the run's `data` section configured, not a fixed one.
    description = client.get_model_version("lmpipe", "4").description
    assert "source='pydoc'" in description and "Bible" not in description
