"""Report: how long each stage of one pipeline execution took, from its MLflow stage runs.

Every stage run carries the tag `lmpipe.pipeline_id` (see `lmpipe.tracking`); its duration is end - start of
the run, i.e. the stage's work without the Python start-up and imports before it (a few seconds per stage).
Stages that DVC skipped or restored from its cache have no run in that execution and are not listed.

    python bench/stage_times.py [--pipeline-id ID] [--out bench/results/stage_times.json]

Without `--pipeline-id` the most recently started pipeline execution is reported.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmpipe import atomic, config
from lmpipe.tracking import TAG_KIND, TAG_PIPELINE, TAG_STAGE, TrackingConfig


def stage_times(pipeline_id: str | None) -> dict:
    import mlflow
    from mlflow.tracking import MlflowClient

    tracking: TrackingConfig = config.build(config.load().logger)
    mlflow.set_tracking_uri(tracking.resolved_uri)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(tracking.experiment_name)
    if experiment is None:
        raise SystemExit(f"no MLflow experiment {tracking.experiment_name!r} at {tracking.resolved_uri}")
    if pipeline_id is None:
        latest = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`{TAG_KIND}` = 'pipeline'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not latest:
            raise SystemExit("no pipeline run found: run `make train` first")
        pipeline_id = latest[0].data.tags[TAG_PIPELINE]
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{TAG_PIPELINE}` = '{pipeline_id}' and tags.`{TAG_KIND}` = 'stage'",
        order_by=["attributes.start_time ASC"],
        max_results=1000,
    )
    stages = []  # a list, in start order: the JSON writer sorts dict keys
    for run in runs:
        info = run.info
        if info.end_time is None:
            continue  # still running, or killed without closing its run
        stages.append({
            "stage": run.data.tags[TAG_STAGE],
            "seconds": round((info.end_time - info.start_time) / 1000, 1),
            "status": info.status,
        })
    starts = [r.info.start_time for r in runs]
    ends = [r.info.end_time for r in runs if r.info.end_time is not None]
    return {
        "pipeline_id": pipeline_id,
        "stages": stages,
        "sum_of_stages_seconds": round(sum(s["seconds"] for s in stages), 1),
        "first_start_to_last_end_seconds": round((max(ends) - min(starts)) / 1000, 1) if ends else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline-id", help="the lmpipe.pipeline_id tag (default: the latest pipeline run)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/stage_times.json"))
    args = parser.parse_args(argv)
    report = stage_times(args.pipeline_id)
    atomic.write_json(args.out, report)
    print(f"pipeline {report['pipeline_id']}")
    print("| stage | seconds |\n|---|---:|")
    for row in report["stages"]:
        print(f"| {row['stage']} | {row['seconds']:.0f} |")
    print(f"sum of stages {report['sum_of_stages_seconds']:.0f} s; "
          f"first start to last end {report['first_start_to_last_end_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
