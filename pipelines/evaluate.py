"""Stage `evaluate`: every model variant side by side (PyTorch and ONNX, fp32 and int8, teacher and students):
perplexity against a Kneser-Ney baseline, the held-out instruction tasks beside a TF-IDF baseline, size and
speed (see `lmpipe.evaluation.suite`).

Outs: <paths.metrics>/evaluate.json (DVC metrics), evaluate.md (the tables), samples.txt, and
<paths.plots>/confusion/<task>.csv (confusion matrices of the fine-tuned model, a DVC plot).
"""

from pathlib import Path

from lmpipe import atomic, config, tracking
from lmpipe.stage import run_stage

SECTIONS = ("seed", "paths", "evaluate", "logger")


def main(cfg):
    import mlflow

    from lmpipe.evaluation.suite import evaluate_all
    from lmpipe.formats import SAMPLES_FILE
    from lmpipe.text_samples import format_samples

    with tracking.stage_run("evaluate", cfg, SECTIONS):
        ev = evaluate_all(
            config.build(cfg.evaluate), Path(cfg.paths.tokens), Path(cfg.paths.instructions), cfg.seed
        )
        metrics_dir = Path(cfg.paths.metrics)
        atomic.write_json(metrics_dir / "evaluate.json", ev.results)
        atomic.write_text(metrics_dir / "evaluate.md", ev.report)
        atomic.write_text(metrics_dir / SAMPLES_FILE, format_samples(ev.samples))
        with atomic.atomic_path(Path(cfg.paths.plots) / "confusion") as tmp:
            tmp.mkdir()
            for task, rows in ev.confusion.items():
                lines = "".join(f"{r['actual']},{r['predicted']}\n" for r in rows)
                (tmp / f"{task}.csv").write_text("actual,predicted\n" + lines, encoding="utf-8")
            mlflow.log_artifacts(str(tmp), "confusion")

        tracking.log_metrics(ev.results)
        mlflow.log_text(ev.report, "evaluate.md")
        mlflow.log_text(format_samples(ev.samples), SAMPLES_FILE)
        print(ev.report)


if __name__ == "__main__":
    raise SystemExit(run_stage("evaluate", SECTIONS, main))
