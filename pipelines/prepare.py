"""Stage `prepare`: load the corpus named by `data`, clean it, split whole documents into train/val/test,
and validate it with Great Expectations.

Outs: <paths.prepared>/corpus.parquet, <paths.prepared>/stats.json, <paths.metrics>/data_validation.json.
A failed expectation stops here (exit 2) with the report written and the previous corpus untouched.
"""

from pathlib import Path

from lmpipe import atomic, config, tracking
from lmpipe.stage import run_stage

SECTIONS = ("seed", "paths", "data", "validate", "logger")


def main(cfg):
    from lmpipe.data.corpus import corpus_stats, prepare_corpus, write_corpus
    from lmpipe.data.validate import raise_for_failures, validate_corpus

    out = Path(cfg.paths.prepared)
    report_path = Path(cfg.paths.metrics) / "data_validation.json"
    with tracking.stage_run("prepare", cfg, SECTIONS):
        corpus = prepare_corpus(config.build(cfg.data), seed=cfg.seed)
        report = validate_corpus(corpus, config.build(cfg.validate))
        atomic.write_json(report_path, report)
        # As 0/1: log_metrics skips booleans, and a failed validation is the value most worth recording.
        tracking.log_metrics({"validation_success": int(report["success"])})
        raise_for_failures(report, report_path=str(report_path))

        stats = corpus_stats(corpus)
        with atomic.atomic_path(out) as tmp:
            tmp.mkdir()
            write_corpus(corpus, tmp / "corpus.parquet")
            atomic.write_json(tmp / "stats.json", stats)
        tracking.log_metrics(stats, prefix="corpus")
        print(f"prepare: {len(corpus)} rows -> {out}")


if __name__ == "__main__":
    raise SystemExit(run_stage("prepare", SECTIONS, main))
