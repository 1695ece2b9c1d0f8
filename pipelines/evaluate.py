"""Stage `evaluate`: every model variant side by side (PyTorch and ONNX, fp32 and int8, teacher and students):
perplexity against a Kneser-Ney baseline, the held-out instruction tasks beside a TF-IDF baseline, size and
speed (see `lmpipe.evaluation.suite`).

Outs: <paths.metrics>/evaluate.json (DVC metrics), evaluate.md (the tables), samples.txt, report.md and report/
(the report card: the tables and PNG figures, with the loss curves of every training stage read from
<paths.plots>), and <paths.plots>/confusion/<task>.csv (confusion matrices of the fine-tuned model, a DVC plot).
"""

from pathlib import Path

from lmpipe import atomic, config, tracking
from lmpipe.stage import run_stage

SECTIONS = ("seed", "paths", "evaluate", "logger")


def main(cfg):
    import mlflow

    from lmpipe.evaluation.report_card import REPORT_DIR, write_report_card
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
        card = write_report_card(metrics_dir, Path(cfg.paths.plots), ev.results, ev.report)
        with atomic.atomic_path(Path(cfg.paths.plots) / "confusion") as tmp:
            tmp.mkdir()
            for task, rows in ev.confusion.items():
                lines = "".join(f"{r['actual']},{r['predicted']}\n" for r in rows)
                (tmp / f"{task}.csv").write_text("actual,predicted\n" + lines, encoding="utf-8")
            mlflow.log_artifacts(str(tmp), "confusion")

        tracking.log_metrics(ev.results)
        mlflow.log_text(ev.report, "evaluate.md")
        mlflow.log_text(format_samples(ev.samples), SAMPLES_FILE)
        # The page at the root and its figures under report/: its relative links work in the artifact view.
        mlflow.log_artifact(str(card.markdown))
        mlflow.log_artifacts(str(card.figures), REPORT_DIR)
        print(ev.report)
        print(f"evaluate: report card {card.markdown}; no loss curves: {', '.join(card.missing) or 'none'}")


if __name__ == "__main__":
    raise SystemExit(run_stage("evaluate", SECTIONS, main))
