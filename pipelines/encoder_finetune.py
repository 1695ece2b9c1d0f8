"""Stage `encoder_finetune`: the encoder (all-MiniLM-L6-v2, or from scratch) fine-tuned on the label tasks,
by `encoder.method`: `full`, `head` (frozen encoder, new heads) or `lora`.

Outs: <paths.encoder>/ (encoder.pt, heads.pt, tokenizer.json, samples.txt), <paths.metrics>/encoder_finetune.json
(test metrics per task), <paths.plots>/encoder_finetune/{train,val}_loss.csv; checkpoints in
<paths.checkpoints>/encoder_finetune/.
"""

from pathlib import Path

from lmpipe import atomic, tracking
from lmpipe.stage import run_stage

SECTIONS = ("seed", "paths", "optimizer", "trainer", "perf", "logger", "encoder")


def main(cfg):
    import mlflow

    from lmpipe.encoder.finetune import finetune_encoder
    from lmpipe.encoder.outputs import write_classifier_dir
    from lmpipe.formats import SAMPLES_FILE
    from lmpipe.text_samples import format_samples
    from lmpipe.training.outputs import write_curves

    with tracking.stage_run("encoder_finetune", cfg, SECTIONS) as run:
        result = finetune_encoder(cfg, run)
        if result is None:  # a DDP worker process
            return
        extra = {"stage": "encoder_finetune", "metrics": result.metrics}
        model_dir = write_classifier_dir(Path(cfg.paths.encoder), result.classifier, extra, result.samples)
        write_curves(Path(cfg.paths.plots) / "encoder_finetune", result.curves)
        atomic.write_json(Path(cfg.paths.metrics) / "encoder_finetune.json", result.metrics)
        tracking.log_metrics(result.metrics, prefix="final")
        mlflow.set_tags({"encoder_init": result.metrics["init"], "encoder_method": result.metrics["method"]})
        mlflow.log_text(format_samples(result.samples), SAMPLES_FILE)
        summary = ", ".join(
            f"{task} acc {m['accuracy']:.3f} macro-F1 {m['f1_macro']:.3f} AUC {m['roc_auc']:.3f}"
            for task, m in result.metrics["tasks"].items()
        )
        print(
            f"encoder_finetune: {result.metrics['init']}/{result.metrics['method']} -> {model_dir}: {summary}"
        )


if __name__ == "__main__":
    raise SystemExit(run_stage("encoder_finetune", SECTIONS, main))
