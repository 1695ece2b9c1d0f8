"""lmpipe.pipeline_run: the pipeline run filled from params.yaml and the metrics files, in a real sqlite store."""

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import fresh_mlflow_db
from omegaconf import OmegaConf

from lmpipe import pipeline_run, tracking
from lmpipe.errors import LmpipeError

ROOT = Path(__file__).resolve().parents[1]

# Small copies of the stages' metrics files: the real structure, few entries (see metrics/*.json).
FILES = {
    "metrics/data_validation.json": {"expectations": [], "n_rows": 120, "success": True},
    "tokens/meta.json": {"dtype": "uint16", "vocab_size": 512, "splits": {"train": {"n_tokens": 900}}},
    "metrics/pretrain.json": {"fit": {"verdict": "underfitting"}, "val_loss": 3.4, "tokens_per_sec": 2600.0},
    "metrics/sft.json": {"method": "full", "val_loss": 2.7},
    "metrics/distill.json": {
        "student": {"teacher": "sft", "val_loss": 3.45, "fit": {"best_val_loss": 3.45}},
        "student-nodistill": {"teacher": "none", "val_loss": 3.49, "parameter_ratio": None},
    },
    "metrics/encoder_mlm.json": {"val_loss": 5.6, "test": {"masked_accuracy": 0.125, "mlm_loss": 5.6}},
    "metrics/encoder_finetune.json": {
        "pretrained": {"tasks": {"book": {"f1_macro": 0.17, "accuracy": 0.28}}, "val_loss": 1.6},
    },
    "metrics/encoder_distill.json": {
        "teacher": {"tasks": {"book": {"f1_macro": 0.2}}},
        "student": {"tasks": {"book": {"f1_macro": 0.18}}},
        "f1_macro_retention": {"student": {"book": 0.9}},
    },
    "metrics/preferences.json": {"total": {"train": 3000, "val": 600}},
    "metrics/reward.json": {"test": {"overall": {"accuracy": 0.8, "pairs": 600}}},
    "metrics/dpo.json": {"test": {"overall": {"accuracy": 0.81}, "reward_margin": 1.6}},
    "metrics/rl.json": {"last_val_reward": 1.27, "reward": "model"},
    "metrics/quantize.json": {
        "teacher": {"dst_bytes": 4, "ratio": 0.25, "src_bytes": 16},
        "classifier": {"ratio": 0.26, "agreement": {"tasks": {}}},
    },
    "metrics/evaluate.json": {
        "lm": {
            "kneser-ney 5-gram": {"order": 5, "test_ppl": 39.5},
            "onnx-teacher": {"test_ppl": 66.1},
            "onnx-teacher-int8": {"test_ppl": 66.12},
        },
        "tasks": {
            "onnx-teacher": {"book": {"f1_macro": 0.09}},
            "tf-idf + logistic regression": {"book": {"f1_macro": 0.16}, "testament": {"roc_auc": 0.9}},
            "encoder-pretrained-full": {"book": {"f1_macro": 0.17}},
        },
        "variants": {
            "onnx-teacher": {
                "test_ppl": 66.1,
                "book_f1_macro": 0.09,
                "testament_roc_auc": 0.95,
                "mc_accuracy": 0.66,
                "file_mb": 16.0,
                "decode_tok_s_b1": 160.0,
            },
            "onnx-teacher-int8": {
                "test_ppl": 66.12,
                "book_f1_macro": 0.087,
                "testament_roc_auc": 0.955,
                "mc_accuracy": None,
                "file_mb": 4.0,
                "decode_tok_s_b1": 400.0,
            },
        },
        "encoders": {"encoder-pretrained-full": {"book_f1_macro": 0.17, "testament_roc_auc": 0.96}},
    },
    "metrics/register.json": {
        "decision": {"promoted": False, "candidate": {"value": 0.087, "variant": "teacher-int8"}},
    },
}
# fmt: off
EXPECTED = {
    "prepare.rows": 120, "prepare.validation_success": 1,
    "tokenize.vocab_size": 512,
    "pretrain.val_loss": 3.4, "pretrain.tokens_per_sec": 2600,
    "sft.val_loss": 2.7,
    "distill.student.val_loss": 3.45, "distill.student-nodistill.val_loss": 3.49,
    "encoder_mlm.val_loss": 5.6, "encoder_mlm.masked_accuracy": 0.125,
    "encoder_finetune.pretrained.book.f1_macro": 0.17,
    "encoder_distill.student.book.f1_macro_retention": 0.9,
    "preferences.train_pairs": 3000,
    "reward.test_accuracy": 0.8,
    "dpo.test_accuracy": 0.81, "dpo.reward_margin": 1.6,
    "rl.val_reward": 1.27,
    "quantize.teacher-int8.size_ratio": 0.25, "quantize.classifier-int8.size_ratio": 0.26,
    "evaluate.onnx-teacher.test_ppl": 66.1, "evaluate.onnx-teacher.book_f1_macro": 0.09,
    "evaluate.onnx-teacher.testament_roc_auc": 0.95, "evaluate.onnx-teacher.mc_accuracy": 0.66,
    "evaluate.onnx-teacher-int8.test_ppl": 66.12, "evaluate.onnx-teacher-int8.book_f1_macro": 0.087,
    "evaluate.onnx-teacher-int8.testament_roc_auc": 0.955,  # its mc_accuracy is None: left out
    "evaluate.onnx-teacher-int8.speed_ratio": 2.5, "evaluate.onnx-teacher-int8.size_ratio": 0.25,
    "evaluate.kneser-ney 5-gram.test_ppl": 39.5,
    "evaluate.tf-idf _ logistic regression.book_f1_macro": 0.16,
    "evaluate.tf-idf _ logistic regression.testament_roc_auc": 0.9,
    "evaluate.encoder-pretrained-full.book_f1_macro": 0.17,
    "evaluate.encoder-pretrained-full.testament_roc_auc": 0.96,
    "register.promoted": 0, "register.candidate_value": 0.087,
}
# fmt: on


def write_files(root: Path, files: dict = FILES) -> None:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(data), encoding="utf-8")


def test_headline_figures_of_every_stage_from_its_metrics_file(tmp_path):
    write_files(tmp_path)
    paths = {"metrics": str(tmp_path / "metrics"), "tokens": str(tmp_path / "tokens")}
    files = pipeline_run.read_headline_files(paths)
    assert set(files) == {h.file for h in pipeline_run.HEADLINES}  # every headline file is one of FILES
    assert pipeline_run.headline_figures(files) == pytest.approx(EXPECTED)

    # An out-of-date stage and a missing file give nothing; the other stages are unchanged.
    (tmp_path / "metrics/rl.json").unlink()
    figures = pipeline_run.headline_figures(pipeline_run.read_headline_files(paths), skip={"evaluate"})
    assert figures == pytest.approx(
        {k: v for k, v in EXPECTED.items() if not k.startswith(("evaluate.", "rl."))}
    )


def test_a_broken_metrics_file_is_named(tmp_path):
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/sft.json").write_text("{", encoding="utf-8")
    with pytest.raises(LmpipeError, match=r"metrics/sft.json is not valid JSON"):
        pipeline_run.read_headline_files({"metrics": str(tmp_path / "metrics"), "tokens": str(tmp_path)})


@pytest.fixture
def workspace(tmp_path, mlflow_template_db, monkeypatch):
    """A workspace (not a git repository) with the repository's params.yaml, its stage scripts, the fake
    metrics files and an MLflow store of its own; no tracking variables from outside."""
    import mlflow

    fresh_mlflow_db(mlflow_template_db, tmp_path / "mlruns.db")
    params = OmegaConf.load(ROOT / "params.yaml")
    params.paths.tokens = "tokens"
    params.logger.experiment_name = "lmpipe-test"
    # Absolute: MLflow caches a store by its URI, and a relative one would reach an earlier test's file.
    params.logger.tracking_uri = f"sqlite:///{tmp_path}/mlruns.db"
    OmegaConf.save(params, tmp_path / "params.yaml")
    shutil.copytree(ROOT / "pipelines", tmp_path / "pipelines")
    write_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    for var in ("MLFLOW_TRACKING_URI", tracking.PIPELINE_ID_ENV, "DVC_EXP_NAME", "GIT_DIR", "GIT_WORK_TREE"):
        monkeypatch.setenv(var, "")  # recorded as absent, so teardown removes whatever MLflow sets
        monkeypatch.delenv(var)
    yield tmp_path
    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def client():
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{Path.cwd()}/mlruns.db")


def stage(name: str, fail: bool = False) -> None:
    """One stage run as a pipeline stage opens it (its sections: seed and model)."""
    cfg = OmegaConf.masked_copy(OmegaConf.load("params.yaml"), ["seed", "model", "logger"])
    if not fail:
        with tracking.stage_run(name, cfg, ("seed", "model")):
            pass
        return
    with pytest.raises(RuntimeError), tracking.stage_run(name, cfg, ("seed", "model")):
        raise RuntimeError("stage failed")


def parent_of(pid: str):
    experiment = client().get_experiment_by_name("lmpipe-test")
    (run,) = client().search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`lmpipe.pipeline_id` = '{pid}' and tags.`lmpipe.kind` = 'pipeline'",
    )
    return run


def test_the_pipeline_run_carries_params_headline_metrics_span_and_tags(workspace, monkeypatch, capsys):
    monkeypatch.setenv(tracking.PIPELINE_ID_ENV, "make-1")
    monkeypatch.setenv("DVC_EXP_NAME", "bushy-reed")
    stage("prepare")
    stage("tokenize")
    assert pipeline_run.main(["--no-dvc-status"]) == 0
    out = capsys.readouterr().out
    assert "pipeline-run: FINISHED" in out and "stages run: prepare, tokenize" in out
    assert "/#/experiments/" in out and "/runs?workflowType=machine_learning" in out

    run = parent_of("make-1")
    assert run.info.status == "FINISHED" and run.info.run_name == "pipeline make-1"
    assert run.data.metrics == pytest.approx(EXPECTED)
    params = run.data.params
    assert params["optimizer.lr"] == str(OmegaConf.load("params.yaml").optimizer.lr)
    sections = {key.partition(".")[0] for key in params}
    assert {"seed", "data", "tokenizer", "model", "optimizer", "trainer", "evaluate", "register"} <= sections
    assert not any(key.startswith("_") or "._target_" in key for key in params)  # Hydra's keys are not params
    tags = run.data.tags
    assert tags["mlflow.source.git.commit"] == "unknown" and tags["lmpipe.git_dirty"] == "false"
    assert tags["lmpipe.dvc_exp"] == "bushy-reed"
    assert tags["lmpipe.stages_run"] == "prepare,tokenize" and tags["lmpipe.stale_stages"] == "none"

    children = client().search_runs([run.info.experiment_id], filter_string="tags.`lmpipe.kind` = 'stage'")
    assert run.info.start_time <= min(c.info.start_time for c in children)
    assert run.info.end_time == max(c.info.end_time for c in children)

    # Filled again (the same configuration): the same run, nothing refused.
    assert pipeline_run.main(["--no-dvc-status"]) == 0
    assert parent_of("make-1").info.run_id == run.info.run_id


def test_a_failed_stage_fails_the_pipeline_run_until_it_succeeds(workspace, monkeypatch):
    monkeypatch.setenv(tracking.PIPELINE_ID_ENV, "make-2")
    stage("prepare")
    stage("tokenize", fail=True)
    assert parent_of("make-2").info.status == "FAILED"  # already at the stage's end, before pipeline-run
    pipeline_run.main(["--no-dvc-status"])
    assert parent_of("make-2").info.status == "FAILED"
    stage("tokenize")  # the failed stage re-run with success
    assert parent_of("make-2").info.status == "FINISHED"
    pipeline_run.main(["--no-dvc-status", "--failed"])  # dvc repro said it failed (a stage outside MLflow)
    assert parent_of("make-2").info.status == "FAILED"


def test_a_pipeline_that_dvc_took_entirely_from_its_cache_still_gets_a_run(workspace, capsys):
    assert pipeline_run.main(["--no-dvc-status", "--id", "make-3"]) == 0
    run = parent_of("make-3")
    assert run.data.tags["lmpipe.stages_run"] == "none" and run.info.status == "FINISHED"
    assert run.data.metrics == pytest.approx(EXPECTED)
    assert "stages run: none (all from DVC)" in capsys.readouterr().out


def test_another_configuration_under_the_same_pipeline_id_is_refused(workspace, capsys):
    assert pipeline_run.main(["--no-dvc-status", "--id", "make-4"]) == 0
    text = Path("params.yaml").read_text(encoding="utf-8").replace("seed: 1337", "seed: 7")
    Path("params.yaml").write_text(text, encoding="utf-8")
    assert pipeline_run.main(["--no-dvc-status", "--id", "make-4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        "pipeline-run: error: pipeline run 'make-4' already has seed=1337 but params.yaml says 7"
    )
    assert len(err.splitlines()) == 1


def test_the_experiment_is_a_model_training_experiment_new_or_existing(workspace):
    stage("prepare")
    experiment = client().get_experiment_by_name("lmpipe-test")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # A store from before the tag gets it at the next stage; a kind someone chose in the UI stays.
    old = client().create_experiment("old", tags={})
    cfg = tracking.TrackingConfig(tracking_uri=f"sqlite:///{workspace}/mlruns.db", experiment_name="old")
    assert tracking.experiment_id(cfg) == old
    assert client().get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    client().set_experiment_tag(old, "mlflow.experimentKind", "genai_development")
    tracking.experiment_id(cfg)
    assert client().get_experiment(old).tags["mlflow.experimentKind"] == "genai_development"


def test_ui_url_names_the_runs_table_or_says_what_to_do(workspace, capsys):
    assert pipeline_run.main(["--url", "http://127.0.0.1:5000/"]) == 2
    assert (
        f"no experiment 'lmpipe-test' in sqlite:///{workspace}/mlruns.db yet: run 'make train' first"
        in capsys.readouterr().err
    )
    stage("prepare")
    assert pipeline_run.main(["--url", "http://127.0.0.1:5000/"]) == 0
    experiment = client().get_experiment_by_name("lmpipe-test").experiment_id
    url = f"http://127.0.0.1:5000/#/experiments/{experiment}/runs?workflowType=machine_learning"
    assert capsys.readouterr().out.strip() == url
    Path("mlruns.db").unlink()
    assert pipeline_run.main(["--url", "http://127.0.0.1:5000"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"pipeline-run: error: no tracking store {workspace}/mlruns.db yet: run 'make train' first"
    )


def test_ui_url_says_what_to_do_when_its_port_is_taken(workspace, capsys):
    import socket

    stage("prepare")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert pipeline_run.main(["--url", f"http://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"pipeline-run: error: 127.0.0.1:{port} is in use (") and "\n" not in err
    assert f"make ui PORT={port + 1}" in err


def test_stages_out_of_date_are_left_out_and_an_unknown_state_is_said(workspace, capsys):
    cfg = tracking.TrackingConfig(
        tracking_uri=f"sqlite:///{workspace}/mlruns.db", experiment_name="lmpipe-test"
    )
    files = pipeline_run.read_headline_files({"metrics": "metrics", "tokens": "tokens"})
    figures = pipeline_run.headline_figures(files, skip={"evaluate", "register"})
    run = pipeline_run.fill_pipeline_run("make-5", cfg, {}, figures, left_out={"evaluate", "register"})
    assert run.left_out == ("evaluate", "register")
    logged = parent_of("make-5").data
    assert logged.tags["lmpipe.stale_stages"] == "evaluate,register"
    assert (
        not any(k.startswith(("evaluate.", "register.")) for k in logged.metrics)
        and "sft.val_loss" in logged.metrics
    )

    assert pipeline_run.main(["--id", "make-6"]) == 0  # not a DVC repository: dvc status cannot tell
    assert "out of date, left out: unknown (dvc status failed)" in capsys.readouterr().out
    assert parent_of("make-6").data.tags["lmpipe.stale_stages"] == "unknown"


def test_dvc_is_the_one_beside_this_python_so_make_needs_no_activated_venv(monkeypatch, tmp_path):
    from lmpipe.pipeline_run import dvc_command

    (tmp_path / "python").touch()
    monkeypatch.setattr("sys.executable", str(tmp_path / "python"))
    assert dvc_command() == "dvc"  # nothing beside it: PATH decides
    (tmp_path / "dvc").touch()
    assert dvc_command() == str(tmp_path / "dvc")


def test_the_report_card_goes_to_the_pipeline_run_unless_evaluate_is_out_of_date(workspace, monkeypatch):
    (workspace / "metrics/report").mkdir()
    (workspace / "metrics/report.md").write_text("# Report card\n", encoding="utf-8")
    (workspace / "metrics/report/loss_curves.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    assert pipeline_run.main(["--no-dvc-status", "--id", "make-7"]) == 0
    run_id = parent_of("make-7").info.run_id
    # The page at the root and its figures under report/, where its relative links point.
    assert {"report.md", "report"} <= {a.path for a in client().list_artifacts(run_id)}
    assert [a.path for a in client().list_artifacts(run_id, "report")] == ["report/loss_curves.png"]
    (workspace / "downloaded").mkdir()
    page = client().download_artifacts(run_id, "report.md", str(workspace / "downloaded"))
    assert Path(page).read_text(encoding="utf-8") == "# Report card\n"

    monkeypatch.setattr(pipeline_run, "stale_stages", lambda: {"evaluate"})  # the card of an earlier config
    assert pipeline_run.main(["--id", "make-8"]) == 0
    logged = {a.path for a in client().list_artifacts(parent_of("make-8").info.run_id)}
    assert not {"report.md", "report"} & logged
