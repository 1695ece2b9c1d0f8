"""Stage `encoder_finetune`: the encoder fine-tuned on the label tasks by `encoder.method` (`full`, `head`:
frozen encoder plus new heads, or `lora`), from `encoder.init`: all-MiniLM-L6-v2 (pretrained) or the
encoder_mlm stage's encoder (scratch); with `encoder.also_scratch`, both, on the same data and budget.

Outs: <paths.encoder>/ and, for the comparison, <paths.encoder>-scratch/ (encoder.pt, heads.pt, tokenizer.json,
samples.txt; the configured init's also onnx/ with the parity-checked ONNX classifier); <paths.metrics>/encoder_finetune.json (test metrics per task, by init);
<paths.plots>/encoder_finetune/<init>/{train,val}_loss.csv; checkpoints in <paths.checkpoints>/encoder_finetune*/.
"""

import json
from functools import partial
from pathlib import Path

from lmpipe import atomic, tracking
from lmpipe.stage import run_stage

SECTIONS = ("seed", "paths", "optimizer", "trainer", "perf", "logger", "encoder")


def main(cfg):
    import mlflow

    from lmpipe.encoder.finetune import finetune_encoder, runs
    from lmpipe.encoder.outputs import write_classifier_dir
    from lmpipe.formats import ENCODER_ONNX_DIR, ONNX_CONFIG_FILE, SAMPLES_FILE
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
            onnx = cfg.encoder.export_onnx and init == cfg.encoder.init
            extra = {"stage": "encoder_finetune", "metrics": result.metrics}
            export = partial(export_onnx, result.classifier) if onnx else None
            write_classifier_dir(model_dir, result.classifier, extra, result.samples, also=export)
            if onnx:
                onnx_config = json.loads((model_dir / ENCODER_ONNX_DIR / ONNX_CONFIG_FILE).read_text("utf-8"))
                metrics[init]["onnx_parity"] = onnx_config["parity"]
        atomic.write_json(Path(cfg.paths.metrics) / "encoder_finetune.json", metrics)
        mlflow.set_tags({"encoder_method": cfg.encoder.method, "encoder_inits": ",".join(metrics)})
        for init, m in metrics.items():
            summary = ", ".join(
                f"{task} acc {t['accuracy']:.3f} macro-F1 {t['f1_macro']:.3f} AUC {t['roc_auc']:.3f}"
                for task, t in m["tasks"].items()
            )
            print(f"encoder_finetune: {init}/{m['method']}, {m['steps']} steps: {summary}")


def export_onnx(classifier, model_dir: Path) -> None:
    from lmpipe.encoder.onnx import export_classifier
    from lmpipe.formats import ENCODER_ONNX_DIR

    export_classifier(classifier, model_dir / ENCODER_ONNX_DIR)


if __name__ == "__main__":
    raise SystemExit(run_stage("encoder_finetune", SECTIONS, main))
