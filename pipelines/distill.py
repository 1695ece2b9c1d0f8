"""Stage `distill`: a smaller student trained on the fine-tuned teacher's soft logits (temperature-scaled KL
mixed with the hard cross-entropy) over pretraining windows and instruction examples; with `distill.ablation`
the same student is trained again without a teacher on the same data and budget, so the gain is measured.

Outs: <paths.models>/student/, <paths.models>/student-nodistill/ (with the ablation), <paths.metrics>/distill.json,
<paths.plots>/distill/; persistent checkpoints in <paths.checkpoints>/distill-*/.
"""

from pathlib import Path

from omegaconf import OmegaConf

from lmpipe import atomic, tracking
from lmpipe.stage import run_stage

SECTIONS = ("seed", "paths", "optimizer", "trainer", "perf", "logger", "distill")
OUTPUTS = {True: "student", False: "student-nodistill"}


def main(cfg):
    import mlflow

    from lmpipe.formats import SAMPLES_FILE
    from lmpipe.text_samples import format_samples
    from lmpipe.training.distill import distill
    from lmpipe.training.outputs import write_curves, write_model_dir

    runs = [cfg] + ([OmegaConf.merge(cfg, {"distill": {"teacher": "none"}})] if cfg.distill.ablation else [])
    metrics, curves = {}, {}
    with tracking.stage_run("distill", cfg, SECTIONS) as run:
        for run_cfg in runs:
            name = OUTPUTS[run_cfg.distill.teacher != "none"]
            if run is None:  # a DDP worker process: no MLflow, no outputs
                distill(run_cfg, None)
                continue
            # Each student logs its curves into its own run, nested under the stage's run.
            with mlflow.start_run(run_name=name, nested=True) as child:
                result = distill(run_cfg, child)
            extra = {"stage": "distill", "variant": name, "metrics": result.metrics}
            write_model_dir(
                Path(cfg.paths.models) / name, result.model, extra, cfg.paths.tokens, result.samples
            )
            metrics[name] = result.metrics
            curves.update({f"{name}_{key}": points for key, points in result.curves.items()})
            mlflow.log_text(format_samples(result.samples), f"{name}/{SAMPLES_FILE}")
        if not metrics:
            return
        write_curves(Path(cfg.paths.plots) / "distill", curves)
        atomic.write_json(Path(cfg.paths.metrics) / "distill.json", metrics)
        tracking.log_metrics(metrics)
        for name, m in metrics.items():
            print(f"distill: {name} {m['student_parameters']:,} parameters, val loss {m['val_loss']:.4f}")


if __name__ == "__main__":
    raise SystemExit(run_stage("distill", SECTIONS, main))
