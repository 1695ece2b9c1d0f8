"""Stage `prepare`: load the corpus named by `data`, clean it, split whole documents into train/val/test,
and validate it with Great Expectations.

Outs: <paths.prepared>/corpus.parquet, <paths.prepared>/stats.json, <paths.metrics>/data_validation.json.
A failed expectation stops here (exit 2) with every output untouched, the tracked report of the last good run
included: the failed report goes to <paths.metrics>/data_validation.failed.json (not tracked) and to the
stage's MLflow run, and is removed by the next run that passes.
"""

from pathlib import Path

from lmpipe import atomic, config, tracking
from lmpipe.stage import run_stage

SECTIONS = ("seed", "paths", "data", "validate", "logger")
REPORT_FILE = "data_validation.json"
FAILED_REPORT_FILE = "data_validation.failed.json"


def main(cfg):
    from lmpipe.data.corpus import CORPUS_FILE, CORPUS_STATS_FILE
    from lmpipe.data.streaming import prepare_to_file
    from lmpipe.data.validate import raise_for_failures, validate_file

    out = Path(cfg.paths.prepared)
    report_path = Path(cfg.paths.metrics) / REPORT_FILE
    failed_path = Path(cfg.paths.metrics) / FAILED_REPORT_FILE
    with tracking.stage_run("prepare", cfg, SECTIONS) as run:
        # Written into a temporary directory that replaces `out` only once everything passed.
        with atomic.atomic_path(out) as tmp:
            tmp.mkdir()
            stats = prepare_to_file(config.build(cfg.data), cfg.seed, tmp / CORPUS_FILE)
            report = validate_file(tmp / CORPUS_FILE, config.build(cfg.validate))
            # As 0/1: log_metrics skips booleans, and a failed validation is the value most worth recording.
            tracking.log_metrics({"validation_success": int(report["success"])})
            if not report["success"]:
                # Not over the tracked report: DVC would see prepare's output changed, and `dvc metrics show`
                # would present the rejected corpus as the current state.
                atomic.write_json(failed_path, report)
                if run is not None:
                    import mlflow

                    mlflow.log_artifact(str(failed_path))
                raise_for_failures(report, report_path=str(failed_path))
            atomic.write_json(tmp / CORPUS_STATS_FILE, stats)
        atomic.write_json(report_path, report)
        failed_path.unlink(missing_ok=True)
        tracking.log_metrics(stats, prefix="corpus")
        print(f"prepare: {stats['rows']} rows -> {out}")


if __name__ == "__main__":
    raise SystemExit(run_stage("prepare", SECTIONS, main))
