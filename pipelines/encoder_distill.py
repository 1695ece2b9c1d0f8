"""Stage `encoder_distill`: the encoder_finetune stage's classifier (the teacher) distilled into a student with
half its layers, initialised from the teacher's every other block (DistilBERT's recipe); with
`encoder_distill.ablation` the same student is trained again without the teacher (alpha=0) on the same data and
budget. Teacher and students are scored on the same test examples.

Outs: <paths.encoder>-student/ (a classifier directory, with onnx/ when encoder_distill.export_onnx),
<paths.encoder>-student-nodistill/ (only skipped.json without the ablation, as dvc.yaml declares it),
<paths.metrics>/encoder_distill.json (teacher, students, and each student's macro-F1 over the teacher's per task),
<paths.plots>/encoder_distill/<student>/{train,val}_loss.csv; checkpoints in <paths.checkpoints>/encoder_distill*/.
"""

from pathlib import Path

from lmpipe import atomic, tracking
from lmpipe.stage import run_stage

SECTIONS = ("seed", "paths", "optimizer", "trainer", "perf", "logger", "encoder", "encoder_distill")


def main(cfg):
    import mlflow

    from lmpipe.encoder.distill import (
        VARIANTS,
        distill_encoder,
        distill_inputs,
        f1_macro_retention,
        teacher_metrics,
    )
    from lmpipe.encoder.onnx import write_classifier_dir_with_onnx
    from lmpipe.encoder.outputs import write_classifier_dir, write_skipped_dir
    from lmpipe.formats import SAMPLES_FILE
    from lmpipe.text_samples import format_samples
    from lmpipe.training.outputs import write_curves

    with tracking.stage_run("encoder_distill", cfg, SECTIONS) as run:
        inputs = distill_inputs(cfg)
        metrics, written = {}, []
        if run is not None:
            metrics["teacher"] = teacher_metrics(inputs)
        for name, ablation in VARIANTS.items():
            if ablation and not cfg.encoder_distill.ablation:
                continue
            if run is None:  # a DDP worker process: no MLflow, no outputs
                distill_encoder(cfg, inputs, ablation)
                continue
            # Each student logs its curves into its own run, nested under the stage's run.
            with mlflow.start_run(run_name=name, nested=True) as child:
                result = distill_encoder(cfg, inputs, ablation, child)
                mlflow.log_text(format_samples(result.samples), f"{name}/{SAMPLES_FILE}")
            written.append((name, result))
            metrics[name] = result.metrics
            write_curves(Path(cfg.paths.plots) / "encoder_distill" / name, result.curves)
        if run is None:
            return
        # Written once both students have finished: a failure in the second leaves the earlier outputs intact.
        for name, result in written:
            model_dir = Path(f"{cfg.paths.encoder}-{name}")
            extra = {"stage": "encoder_distill", "variant": name, "metrics": result.metrics}
            if cfg.encoder_distill.export_onnx and name == "student":
                parity = write_classifier_dir_with_onnx(model_dir, result.classifier, extra, result.samples)
                metrics[name]["onnx_parity"] = parity
            else:
                write_classifier_dir(model_dir, result.classifier, extra, result.samples)
        if "student-nodistill" not in metrics:
            # dvc.yaml declares the ablation's outputs: without it they hold a note saying why they are empty.
            reason = "encoder_distill.ablation=false"
            write_skipped_dir(f"{cfg.paths.encoder}-student-nodistill", "encoder_distill", reason)
            (Path(cfg.paths.checkpoints) / "encoder_distill-nodistill").mkdir(parents=True, exist_ok=True)
        metrics["f1_macro_retention"] = f1_macro_retention(metrics)
        atomic.write_json(Path(cfg.paths.metrics) / "encoder_distill.json", metrics)
        tracking.log_metrics({k: v for k, v in metrics.items() if k != "teacher"}, prefix="final")
        teacher = metrics["teacher"]
        for name, ratios in metrics["f1_macro_retention"].items():
            m = metrics[name]
            scores = ", ".join(
                f"{task} macro-F1 {m['tasks'][task]['f1_macro']:.3f} ({ratio:.0%} of the teacher's "
                f"{teacher['tasks'][task]['f1_macro']:.3f})"
                for task, ratio in ratios.items()
            )
            layers = f"{m['n_layer']} of {teacher['n_layer']} layers"
            print(f"encoder_distill: {name}, {layers}, {m['steps']} steps: {scores}")


if __name__ == "__main__":
    raise SystemExit(run_stage("encoder_distill", SECTIONS, main))
