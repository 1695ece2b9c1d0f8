"""The pipeline run: the MLflow parent run of one pipeline execution, filled with what the whole run produced.

The stages log into child runs as they go; this module gives their parent what a comparison of two pipeline
executions needs, so that ticking two pipeline runs and pressing *Compare* shows every setting and result:

- params: the composed configuration (`params.yaml`), every section a stage reads, flattened as `section.key`;
- metrics: the headline figures of every stage, read from the stages' metrics files (`HEADLINES`), not from
  their MLflow logging, so a stage that DVC skipped or restored from its run cache still counts; a stage that
  `dvc status` says is out of date (it failed, or never ran after a change upstream) is left out, since its
  file describes an earlier configuration;
- its span: from the earliest stage start to the latest stage end; its status: FAILED when a stage failed;
- tags: git commit, dirty flag, DVC experiment name, which stages ran, which were left out as out of date;
- artifacts: evaluate's report card (`report.md` and its figures under `report/`), unless evaluate is out of date.

It runs after the pipeline, not as a stage (a stage would make DVC re-run things, or depend on them all):
`make train` and `make exp` run `python -m lmpipe.pipeline_run` after `dvc repro` / `dvc exp run`, also when
they fail (`--failed`). No stage script imports this module, so it is no stage's dependency. The same headline
figures make the table of DVC experiments (`lmpipe.exp_compare`, `make compare`).
"""

from __future__ import annotations

import argparse
import json
import numbers
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmpipe import config, tracking
from lmpipe.errors import LmpipeError
from lmpipe.evaluation.report_card import REPORT_DIR, REPORT_FILE
from lmpipe.stage import PIPELINES_DIR, stage_scripts

Figures = dict[str, Any]
TAG_LEFT_OUT = "lmpipe.stale_stages"
"""On a pipeline run: the stages whose headline figures were left out as out of date (`dvc status`), "none",
or "unknown" when DVC could not tell."""


@dataclass(frozen=True)
class Headline:
    """A stage's headline figures: which file holds them and how to pick them out of it."""

    stage: str
    """The DVC stage that writes the file (what `dvc status` names when it is out of date)."""
    file: str
    """The file, `{metrics}/...` or `{tokens}/...` (params.yaml's `paths.metrics`, `paths.tokens`)."""
    pick: Callable[[dict], Figures]
    """The figures, by name (without the stage prefix); None values are left out."""


def _entries(data: dict, key: str) -> dict[str, dict]:
    """The named sub-dicts of `data` that hold `key` (variants, students, quantized files)."""
    return {name: v for name, v in data.items() if isinstance(v, dict) and key in v}


def _dig(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _ratio(num: Any, den: Any) -> float | None:
    ok = all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in (num, den))
    return num / den if ok and den else None


def _evaluate(data: dict) -> Figures:
    variants = data.get("variants", {})
    figures: Figures = {}
    for name, row in variants.items():
        for key in ("test_ppl", "book_f1_macro", "testament_roc_auc", "mc_accuracy"):
            figures[f"{name}.{key}"] = row.get(key)
        base = variants.get(name.removesuffix("-int8")) if name.endswith("-int8") else None
        if base is not None:  # int8 against its fp32 source: decode speed at batch 1 and file size
            figures[f"{name}.speed_ratio"] = _ratio(row.get("decode_tok_s_b1"), base.get("decode_tok_s_b1"))
            figures[f"{name}.size_ratio"] = _ratio(row.get("file_mb"), base.get("file_mb"))
    for name, row in data.get("lm", {}).items():
        if name not in variants:  # the n-gram baseline
            figures[f"{name}.test_ppl"] = row.get("test_ppl")
    for name, tasks in data.get("tasks", {}).items():
        if name not in variants and name not in data.get("encoders", {}):  # the TF-IDF baseline
            figures[f"{name}.book_f1_macro"] = _dig(tasks, "book", "f1_macro")
            figures[f"{name}.testament_roc_auc"] = _dig(tasks, "testament", "roc_auc")
    for name, row in data.get("encoders", {}).items():
        for key in ("book_f1_macro", "testament_roc_auc"):
            figures[f"{name}.{key}"] = row.get(key)
    return figures


HEADLINES: tuple[Headline, ...] = (
    Headline(
        "prepare",
        "{metrics}/data_validation.json",
        lambda d: {"rows": d.get("n_rows"), "validation_success": d.get("success")},
    ),
    Headline("tokenize", "{tokens}/meta.json", lambda d: {"vocab_size": d.get("vocab_size")}),
    Headline(
        "pretrain",
        "{metrics}/pretrain.json",
        lambda d: {"val_loss": d.get("val_loss"), "tokens_per_sec": d.get("tokens_per_sec")},
    ),
    Headline("sft", "{metrics}/sft.json", lambda d: {"val_loss": d.get("val_loss")}),
    Headline(
        "distill",
        "{metrics}/distill.json",
        lambda d: {f"{name}.val_loss": s["val_loss"] for name, s in _entries(d, "val_loss").items()},
    ),
    Headline(
        "encoder_mlm",
        "{metrics}/encoder_mlm.json",
        lambda d: {"val_loss": d.get("val_loss"), "masked_accuracy": _dig(d, "test", "masked_accuracy")},
    ),
    Headline(
        "encoder_finetune",
        "{metrics}/encoder_finetune.json",
        lambda d: {
            f"{name}.{task}.f1_macro": m.get("f1_macro")
            for name, v in _entries(d, "tasks").items()
            for task, m in v["tasks"].items()
        },
    ),
    Headline(
        "encoder_distill",
        "{metrics}/encoder_distill.json",
        lambda d: {
            f"{name}.{task}.f1_macro_retention": ratio
            for name, tasks in d.get("f1_macro_retention", {}).items()
            for task, ratio in tasks.items()
        },
    ),
    Headline(
        "preferences", "{metrics}/preferences.json", lambda d: {"train_pairs": _dig(d, "total", "train")}
    ),
    Headline(
        "reward", "{metrics}/reward.json", lambda d: {"test_accuracy": _dig(d, "test", "overall", "accuracy")}
    ),
    Headline(
        "dpo",
        "{metrics}/dpo.json",
        lambda d: {
            "test_accuracy": _dig(d, "test", "overall", "accuracy"),
            "reward_margin": _dig(d, "test", "reward_margin"),
        },
    ),
    Headline("rl", "{metrics}/rl.json", lambda d: {"val_reward": d.get("last_val_reward")}),
    Headline(
        "quantize",
        "{metrics}/quantize.json",
        lambda d: {f"{name}-int8.size_ratio": q["ratio"] for name, q in _entries(d, "ratio").items()},
    ),
    Headline("evaluate", "{metrics}/evaluate.json", _evaluate),
    Headline(
        "register",
        "{metrics}/register.json",
        lambda d: {
            "promoted": _dig(d, "decision", "promoted"),
            "candidate_value": _dig(d, "decision", "candidate", "value"),
        },
    ),
)
"""Every stage's headline figures, logged to the pipeline run as `<stage>.<figure>` (the one place they are
chosen). export and infer have none: export's parity checks fail the stage, infer writes generations. Booleans
count as 0/1 (a failed validation or a refused promotion is the value most worth seeing)."""


def headline_figures(file_data: Mapping[str, dict], skip: set[str] = frozenset()) -> dict[str, float]:
    """`<stage>.<figure>` -> value, from each headline file's parsed JSON (`file_data`, keyed by
    `Headline.file`); files that are absent and stages in `skip` give nothing."""
    figures = {}
    for headline in HEADLINES:
        data = file_data.get(headline.file)
        if headline.stage in skip or not isinstance(data, dict):
            continue
        for name, value in headline.pick(data).items():
            if isinstance(value, numbers.Real):  # None (not measured) is left out; a bool counts 0/1
                figures[tracking.metric_name(f"{headline.stage}.{name}")] = float(value)
    return figures


def read_headline_files(paths: Mapping[str, str]) -> dict[str, dict]:
    """The parsed headline files that exist, keyed by `Headline.file`; `paths` gives `metrics` and `tokens`."""
    found = {}
    for headline in HEADLINES:
        path = Path(headline.file.format(**paths))
        if path.is_file():
            try:
                found[headline.file] = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise LmpipeError(f"{path} is not valid JSON: {exc}") from exc
    return found


def pipeline_params(
    params_file: Path = config.PARAMS_FILE, pipelines: Path = PIPELINES_DIR
) -> dict[str, str]:
    """params.yaml flattened as `section.key`: every section some stage script in `pipelines` reads."""
    cfg = config.load(params_file=params_file)
    scripts = stage_scripts(pipelines).values()
    sections = sorted({s for script in scripts for s in script.sections if s in cfg})
    flat = config.flatten({name: tracking.loggable(cfg[name]) for name in sections})
    return {key: tracking.short(value) for key, value in flat.items()}


def dvc_command() -> str:
    """The `dvc` installed beside this Python (the project's .venv), else whichever is on PATH: `make` runs
    `.venv/bin/python` without the virtual environment's bin folder on PATH."""
    beside = Path(sys.executable).with_name("dvc")
    return str(beside) if beside.is_file() else "dvc"


def stale_stages() -> set[str] | None:
    """The stages `dvc status` lists as out of date; None where DVC cannot tell (no DVC repository)."""
    try:
        proc = subprocess.run([dvc_command(), "status", "--json"], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    try:
        status = json.loads(proc.stdout or "{}")
    except json.JSONDecodeError:
        return None
    return {name.rpartition(":")[2] for name in status}


@dataclass(frozen=True)
class PipelineRun:
    run_id: str
    experiment_id: str
    status: str
    params: int
    metrics: int
    stages_run: tuple[str, ...]
    left_out: tuple[str, ...] | None
    """None: DVC could not tell which stages are out of date."""


def fill_pipeline_run(
    pid: str,
    tracking_cfg: tracking.TrackingConfig,
    params: Mapping[str, str],
    figures: Mapping[str, float],
    failed: bool = False,
    left_out: set[str] | None = frozenset(),
    report: Path | None = None,
) -> PipelineRun:
    """Give pipeline `pid`'s parent run (created if no stage of it ran: DVC had everything) its params,
    headline metrics, span, status, tags and the report card `report` (REPORT_FILE, its figures in REPORT_DIR
    beside it); `left_out`: the stages left out as out of date, None if unknown. See the module docstring."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    experiment_id = tracking.experiment_id(tracking_cfg)
    client = MlflowClient()
    commit, dirty = tracking.git_commit()
    parent_id = tracking.parent_run(experiment_id, pid, commit)
    parent = client.get_run(parent_id)
    clashes = {k: (parent.data.params[k], v) for k, v in params.items() if parent.data.params.get(k, v) != v}
    if clashes:
        key, (was, now) = next(iter(sorted(clashes.items())))
        raise LmpipeError(
            f"pipeline run '{pid}' already has {key}={was} but params.yaml says {now} ({len(clashes)} params "
            f"differ): a new configuration needs a new pipeline id (LMPIPE_PIPELINE_ID, or --id)"
        )
    children = tracking.stage_runs(client, experiment_id, pid)
    exp_names = {r.data.tags[tracking.TAG_DVC_EXP] for r in children if r.data.tags.get(tracking.TAG_DVC_EXP)}
    stages_run = tuple(sorted({r.data.tags.get(tracking.TAG_STAGE, "") for r in children}))
    tags = {
        "mlflow.source.git.commit": commit,
        tracking.TAG_DIRTY: str(dirty).lower(),
        tracking.TAG_STAGES_RUN: ",".join(stages_run) or "none",
        TAG_LEFT_OUT: "unknown" if left_out is None else ",".join(sorted(left_out)) or "none",
    }
    exp_name = tracking.dvc_exp_name() or (sorted(exp_names)[0] if len(exp_names) == 1 else None)
    if exp_name:
        tags[tracking.TAG_DVC_EXP] = exp_name
    new_params = {k: v for k, v in params.items() if k not in parent.data.params}
    stamp = int(time.time() * 1000)
    client.log_batch(
        parent_id,
        metrics=[Metric(k, v, stamp, 0) for k, v in figures.items()],
        params=[Param(k, v) for k, v in new_params.items()],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )
    if report is not None:
        # As the evaluate run logs it: the page at the root, its figures under report/ (its links' target).
        client.log_artifact(parent_id, str(report))
        if (report.parent / REPORT_DIR).is_dir():
            client.log_artifacts(parent_id, str(report.parent / REPORT_DIR), REPORT_DIR)
    status = tracking.close_pipeline_run(client, parent_id, children, failed=failed)
    return PipelineRun(
        parent_id,
        experiment_id,
        status,
        len(params),
        len(figures),
        stages_run,
        None if left_out is None else tuple(sorted(left_out)),
    )


def run_for_workspace(pid: str | None = None, failed: bool = False, check_dvc: bool = True) -> PipelineRun:
    """Fill the pipeline run of this workspace's last pipeline from params.yaml and the metrics files."""
    cfg = config.load(params_file=config.PARAMS_FILE)
    tracking_cfg: tracking.TrackingConfig = config.build(cfg.logger)
    stale = stale_stages() if check_dvc else set()
    files = read_headline_files({"metrics": cfg.paths.metrics, "tokens": cfg.paths.tokens})
    figures = headline_figures(files, skip=stale or set())
    left_out = None if stale is None else stale & {h.stage for h in HEADLINES}
    report = Path(cfg.paths.metrics) / REPORT_FILE
    fresh = "evaluate" not in (stale or set())  # an out-of-date card describes an earlier configuration
    return fill_pipeline_run(
        pid or tracking.pipeline_id(),
        tracking_cfg,
        pipeline_params(),
        figures,
        failed=failed,
        left_out=left_out,
        report=report if fresh and report.is_file() else None,
    )


def experiment_url(tracking_cfg: tracking.TrackingConfig, base: str) -> str:
    """The UI's runs table of the project's experiment; one line saying what to do when there is none yet."""
    import mlflow

    uri = tracking_cfg.resolved_uri
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise LmpipeError(f"no tracking store {uri.removeprefix('sqlite:///')} yet: run 'make train' first")
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(tracking_cfg.experiment_name)
    if experiment is None:
        raise LmpipeError(
            f"no experiment '{tracking_cfg.experiment_name}' in {uri} yet: run 'make train' first"
        )
    return tracking.runs_url(experiment.experiment_id, base)


def check_port_free(base: str) -> None:
    """Before `make ui` starts a UI at `base`: a one-line error when something already listens on its port
    (MLflow's server would otherwise fail with a traceback after its workers started)."""
    import socket
    from urllib.parse import urlsplit

    where = urlsplit(base)
    host, port = where.hostname or "127.0.0.1", where.port or 5000
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise LmpipeError(
                f"{host}:{port} is in use ({exc.strerror}): if it is an MLflow UI already, open {base}; else stop "
                f"what holds it, or pick another port (make ui PORT={port + 1})"
            ) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name if __spec__ else 'lmpipe.pipeline_run'}",
        description="Fill the MLflow pipeline run of the last pipeline from params.yaml and the metrics files.",
    )
    parser.add_argument(
        "--id",
        help="pipeline id (default: LMPIPE_PIPELINE_ID, DVC_EXP_NAME, else what a "
        "plain dvc repro of this commit and params.yaml used)",
    )
    parser.add_argument("--failed", action="store_true", help="the pipeline failed: mark the run FAILED")
    parser.add_argument(
        "--no-dvc-status", action="store_true", help="keep every stage's figures (no dvc status)"
    )
    parser.add_argument(
        "--url", metavar="BASE", help="only print the UI's runs table under BASE (its port must be free) and exit"
    )
    args = parser.parse_args(argv)
    from mlflow.exceptions import MlflowException

    try:
        if args.url:
            cfg = config.load(params_file=config.PARAMS_FILE)
            url = experiment_url(config.build(cfg.logger), args.url.rstrip("/"))
            check_port_free(args.url)
            print(url)
            return 0
        run = run_for_workspace(args.id, failed=args.failed, check_dvc=not args.no_dvc_status)
    except LmpipeError as exc:
        print(f"pipeline-run: error: {config.one_line(exc)}", file=sys.stderr)
        return 2
    except MlflowException as exc:
        import mlflow

        uri = mlflow.get_tracking_uri()
        print(f"pipeline-run: error: cannot record in {uri}: {config.one_line(exc)}", file=sys.stderr)
        return 2
    left_out = "unknown (dvc status failed)" if run.left_out is None else ", ".join(run.left_out) or "none"
    print(
        f"pipeline-run: {run.status}, {run.params} params, {run.metrics} headline metrics; "
        f"stages run: {', '.join(run.stages_run) or 'none (all from DVC)'}; out of date, left out: {left_out}"
    )
    print(f"pipeline-run: {tracking.runs_url(run.experiment_id)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
