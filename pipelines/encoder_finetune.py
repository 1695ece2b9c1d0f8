"""Stage `encoder_finetune`: the encoder fine-tuned on the label tasks by `encoder.method` (`full`, `head`:
frozen encoder plus new heads, or `lora`), from `encoder.init`: all-MiniLM-L6-v2 (pretrained) or the
encoder_mlm stage's encoder (scratch); with `encoder.also_scratch`, both, on the same data and budget.

Outs: <paths.encoder>/ and, for the comparison, <paths.encoder>-scratch/ (encoder.pt, heads.pt, tokenizer.json,
samples.txt; the configured init's also onnx/ with the parity-checked ONNX classifier); without the comparison
(also_scratch off, or init=scratch) <paths.encoder>-scratch/ holds only skipped.json, as dvc.yaml declares it;
<paths.metrics>/encoder_finetune.json (test metrics per task, by init);
<paths.plots>/encoder_finetune/<init>/{train,val}_loss.csv; checkpoints in <paths.checkpoints>/encoder_finetune*/.
"""

from pathlib import Path

from lmpipe import atomic, tracking
from lmpipe.stage import run_stage

SECTIONS = ("seed", "paths", "optimizer", "trainer", "perf", "logger", "encoder")


def main(cfg):
    import mlflow

    from lmpipe.encoder.finetune import finetune_encoder, runs
    from lmpipe.encoder.onnx import write_classifier_dir_with_onnx
    from lmpipe.encoder.outputs import write_classifier_dir, write_skipped_dir
    from lmpipe.formats import SAMPLES_FILE
    from lmpipe.text_samples import format_samples
    from lmpipe.training.outputs import write_curves

    with tracking.stage_run("encoder_finetune", cfg, SECTIONS) as run:
        metrics, written = {}, []
        for init in runs(cfg):
            result = finetune_encoder(cfg, run, init)
            if result is None:  # a DDP worker process
                return
            model_dir = Path(cfg.paths.encoder if init == cfg.encoder.init else f"{cfg.paths.encoder}-{init}")
            written.append((model_dir, result))
            metrics[init] = result.metrics
            write_curves(Path(cfg.paths.plots) / "encoder_finetune" / init, result.curves)
            tracking.log_metrics(result.metrics, prefix=f"final_{init}")
            mlflow.log_text(format_samples(result.samples), f"{init}/{SAMPLES_FILE}")
        # Written once every run has finished: a failure in the second leaves the earlier outputs intact.
        for model_dir, result in written:
            init = result.metrics["init"]
            extra = {"stage": "encoder_finetune", "metrics": result.metrics}
            if cfg.encoder.export_onnx and init == cfg.encoder.init:
                parity = write_classifier_dir_with_onnx(model_dir, result.classifier, extra, result.samples)
                metrics[init]["onnx_parity"] = parity
            else:
                write_classifier_dir(model_dir, result.classifier, extra, result.samples)
        comparison = Path(f"{cfg.paths.encoder}-scratch")
        if comparison not in [model_dir for model_dir, _ in written]:
            # dvc.yaml declares the comparison's outputs: without it they hold a note saying why they are empty.
            reason = f"encoder.also_scratch={cfg.encoder.also_scratch}, encoder.init={cfg.encoder.init}"
            write_skipped_dir(comparison, "encoder_finetune", reason)
            (Path(cfg.paths.checkpoints) / "encoder_finetune-scratch").mkdir(parents=True, exist_ok=True)
        atomic.write_json(Path(cfg.paths.metrics) / "encoder_finetune.json", metrics)
        mlflow.set_tags({"encoder_method": cfg.encoder.method, "encoder_inits": ",".join(metrics)})
        for init, m in metrics.items():
            summary = ", ".join(
                f"{task} acc {t['accuracy']:.3f} macro-F1 {t['f1_macro']:.3f} AUC {t['roc_auc']:.3f}"
                for task, t in m["tasks"].items()
            )
            print(f"encoder_finetune: {init}/{m['method']}, {m['steps']} steps: {summary}")


if __name__ == "__main__":
    raise SystemExit(run_stage("encoder_finetune", SECTIONS, main))
