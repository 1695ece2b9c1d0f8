"""Bad input, end to end: the real stage scripts, run as `dvc repro` would, stop with one line naming the problem.

Every run happens in a temporary copy of the repository layout (conf/ and pipelines/, MLflow store included),
with each `paths.*` pointing into the test's own folder, which holds sentinel outputs of an earlier run:
a failed stage must leave them byte for byte as they were.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SENTINELS = {
    "data/prepared/corpus.parquet": b"previous corpus",
    "data/prepared/stats.json": b'{"rows": 1}\n',
    "models/pretrain/model.pt": b"previous model",
    "metrics/data_validation.json": b'{"success": true}\n',
    "plots/pretrain/train_loss.csv": b"step,loss\n",
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A stand-in for the repository root, shared by the module so the MLflow store is created once."""
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(ROOT / "conf", root / "conf")
    shutil.copytree(ROOT / "pipelines", root / "pipelines", ignore=shutil.ignore_patterns("__pycache__"))
    return root


@pytest.fixture
def outputs(tmp_path):
    """Earlier outputs of every stage, and the overrides that point the stages at them."""
    out = tmp_path / "out"
    for rel, data in SENTINELS.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    (out / "data" / "tokens").mkdir()
    paths = {
        "prepared": out / "data" / "prepared",
        "tokens": out / "data" / "tokens",
        "models": out / "models",
        "checkpoints": out / "checkpoints",
        "metrics": out / "metrics",
        "plots": out / "plots",
    }
    return out, [f"paths.{key}='{value}'" for key, value in paths.items()]


def snapshot(folder: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))
    }


def run_script(workdir: Path, script: str, *overrides: str, pipeline_id: str = "stage-errors"):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME")}
    env.update(
        LMPIPE_PIPELINE_ID=pipeline_id,
        GX_ANALYTICS_ENABLED="false",
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        PYTHONDONTWRITEBYTECODE="1",
    )
    return subprocess.run(
        [sys.executable, f"pipelines/{script}", "experiment=smoke", *overrides],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def error_line(proc: subprocess.CompletedProcess, stage: str) -> str:
    """The run failed with exit 2 and exactly one error line, the last on stderr, and no traceback."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    errors = [line for line in lines if line.startswith(f"{stage}: error: ")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert lines[-1] == errors[0]
    return errors[0]


def test_empty_text_file(workdir, outputs, tmp_path):
    out, paths = outputs
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    before = snapshot(out)
    proc = run_script(workdir, "prepare.py", "data=text", f"data.paths=['{empty}']", *paths)
    assert error_line(proc, "prepare") == f"prepare: error: {empty}: file is empty, expected UTF-8 text"
    assert snapshot(out) == before


def test_non_utf8_text_file(workdir, outputs, tmp_path):
    out, paths = outputs
    good = tmp_path / "good.txt"
    good.write_text("In the beginning.\n\nAnd the earth.\n", encoding="utf-8")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Café au lait.\n".encode("latin-1"))
    before = snapshot(out)
    proc = run_script(workdir, "prepare.py", "data=text", f"data.paths=['{good}','{latin1}']", *paths)
    line = error_line(proc, "prepare")
    assert line.startswith(f"prepare: error: {latin1}: not valid UTF-8 at byte 3")
    assert line.endswith("expected UTF-8 text")
    assert snapshot(out) == before


def test_jsonl_record_without_the_text_field(workdir, outputs, tmp_path):
    out, paths = outputs
    records = tmp_path / "records.jsonl"
    records.write_text('{"text": "first"}\n\n{"body": "second", "id": 2}\n', encoding="utf-8")
    before = snapshot(out)
    proc = run_script(workdir, "prepare.py", "data=text", f"data.paths=['{records}']", *paths)
    line = error_line(proc, "prepare")
    assert line.startswith(f"prepare: error: {records}:3: record has no 'text' field (set data.text_field)")
    assert snapshot(out) == before


@pytest.mark.parametrize("override", ["model.n_layr=3", "+model.n_layr=3"])
def test_unknown_config_key(workdir, outputs, override):
    out, paths = outputs
    before = snapshot(out)
    proc = run_script(workdir, "pretrain.py", override, *paths)
    assert "'model.n_layr'" in error_line(proc, "pretrain")
    assert snapshot(out) == before


def test_pretrain_without_token_shards(workdir, outputs):
    out, paths = outputs
    before = snapshot(out)
    proc = run_script(workdir, "pretrain.py", *paths)
    line = error_line(proc, "pretrain")
    meta = out / "data" / "tokens" / "meta.json"
    assert line == (
        f"pretrain: error: missing shard metadata {meta}: run the tokenize stage first (dvc repro tokenize)"
    )
    assert snapshot(out) == before


def test_tokenize_without_prepared_corpus(workdir, outputs, tmp_path):
    out, paths = outputs
    nowhere = tmp_path / "not-prepared"
    before = snapshot(out)
    proc = run_script(workdir, "tokenize_corpus.py", *paths, f"paths.prepared='{nowhere}'")
    line = error_line(proc, "tokenize")
    assert line == (
        f"tokenize: error: missing input {nowhere / 'corpus.parquet'} (run the 'prepare' stage first:"
        " dvc repro prepare)"
    )
    assert snapshot(out) == before


def test_tokenize_on_a_truncated_corpus(workdir, outputs):
    # The sentinel corpus.parquet is a few bytes, not parquet: as a truncated file would be.
    out, paths = outputs
    (out / "data" / "tokens" / "train.bin").write_bytes(b"previous tokens")
    before = snapshot(out)
    proc = run_script(workdir, "tokenize_corpus.py", *paths)
    line = error_line(proc, "tokenize")
    corpus = out / "data" / "prepared" / "corpus.parquet"
    assert line.startswith(f"tokenize: error: {corpus}: not a readable parquet corpus (")
    assert line.endswith("); re-run prepare")
    assert snapshot(out) == before


def test_failed_expectation_keeps_the_tracked_report_and_the_corpus(workdir, outputs):
    from mlflow.tracking import MlflowClient

    out, paths = outputs
    before = snapshot(out)
    ruth = ("data=kjv", "data.books=[Ruth]")
    proc = run_script(
        workdir, "prepare.py", *ruth, "validate.max_chars=5", *paths, pipeline_id="stage-errors-ge"
    )
    line = error_line(proc, "prepare")
    failed_path = out / "metrics" / "data_validation.failed.json"
    assert line.startswith(
        "prepare: error: data validation failed: expect_column_value_lengths_to_be_between(text)"
    )
    assert "expected text length in [1, 5] chars" in line
    assert line.endswith(f"(see {failed_path})")

    # The failed report goes beside the tracked one, which still holds the last good run's ...
    report = json.loads(failed_path.read_text(encoding="utf-8"))
    assert report["success"] is False
    failed = [e["expectation"] for e in report["expectations"] if not e["success"]]
    assert failed[0] == "expect_column_value_lengths_to_be_between"
    # ... and every earlier output, the prepared corpus and the tracked report above all, is untouched.
    after = snapshot(out)
    changed = {rel for rel in before.keys() | after.keys() if before.get(rel) != after.get(rel)}
    assert changed == {"metrics/data_validation.failed.json"}

    # The failed validation is on record in MLflow too: a failed stage run with validation_success 0 and the report.
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlruns.db")
    experiment = client.get_experiment_by_name("lmpipe")
    [run] = client.search_runs(
        [experiment.experiment_id],
        filter_string="tags.`lmpipe.pipeline_id` = 'stage-errors-ge' and tags.`lmpipe.stage` = 'prepare'",
    )
    assert run.info.status == "FAILED"
    assert run.data.metrics == {"validation_success": 0.0}
    assert run.data.params["validate.max_chars"] == "5"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["data_validation.failed.json"]

    # The next run that passes writes the tracked report and removes the stale failed one.
    proc = run_script(workdir, "prepare.py", *ruth, "validate.min_rows_per_split=1", *paths)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "metrics" / "data_validation.json").read_text())["success"] is True
    assert not failed_path.exists()


def test_override_of_a_section_the_stage_does_not_read(workdir, outputs):
    # Once silently ignored while pretrain trained and overwrote its model: now refused before anything runs.
    out, paths = outputs
    before = snapshot(out)
    proc = run_script(workdir, "pretrain.py", "tokenizer.vocab_size=3", *paths)
    assert error_line(proc, "pretrain") == (
        "pretrain: error: override 'tokenizer.vocab_size=3': stage pretrain does not read section 'tokenizer'"
        " (read by: tokenize)"
    )
    assert snapshot(out) == before
