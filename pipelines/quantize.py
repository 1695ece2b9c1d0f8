"""Stage `quantize`: ONNX Runtime int8 quantization of the exported models in `quantize.variants` (dynamic by
default; static calibrates activations on windows of the val split), and of the encoder classifier's ONNX
export (<paths.encoder>/onnx, always dynamic), whose labels are checked against fp32 on held-out verses.

Outs: <paths.onnx>/<variant>-int8/ (a servable ONNX dir like its source), <paths.onnx>/classifier-int8/ (an
ONNX classifier dir like its source), <paths.metrics>/quantize.json (file sizes; the classifier's agreement).
"""

from pathlib import Path

from lmpipe import atomic, config, tracking
from lmpipe.errors import LmpipeError
from lmpipe.stage import run_stage

SECTIONS = ("paths", "quantize", "logger")


def main(cfg):
    from lmpipe.compress import quantize_onnx
    from lmpipe.encoder.quantize import held_out_texts, quantize_classifier
    from lmpipe.encoder.serving import read_classifier_config
    from lmpipe.formats import CLASSIFIER_INT8_DIR, ENCODER_ONNX_DIR, ONNX_FILE
    from lmpipe.tokenizer import read_shard

    qcfg = config.build(cfg.quantize)
    onnx, source = Path(cfg.paths.onnx), Path(cfg.paths.encoder) / ENCODER_ONNX_DIR
    # Every input is checked before anything is written.
    if not (source / ONNX_FILE).is_file():
        raise LmpipeError(
            f"missing {source / ONNX_FILE}: the quantize stage needs the encoder classifier's ONNX export "
            f"(encoder_finetune with encoder.export_onnx=true)"
        )
    read_classifier_config(source)
    calibration = read_shard(cfg.paths.tokens, "val") if qcfg.method == "static" else None
    texts = held_out_texts(cfg.paths.instructions, qcfg.agreement_texts)
    report = {}
    with tracking.stage_run("quantize", cfg, SECTIONS):
        for variant in qcfg.variants:
            report[variant] = quantize_onnx(onnx / variant, onnx / f"{variant}-int8", qcfg, calibration)
            print(f"quantize: {variant}-int8 is {report[variant]['ratio']:.2f}x the fp32 file", flush=True)
        report["classifier"] = quantize_classifier(source, onnx / CLASSIFIER_INT8_DIR, qcfg, texts)
        kept = ", ".join(
            f"{task} {a['label_agreement']:.3f}"
            for task, a in report["classifier"]["agreement"]["tasks"].items()
        )
        ratio = report["classifier"]["ratio"]
        print(
            f"quantize: {CLASSIFIER_INT8_DIR} is {ratio:.2f}x the fp32 file; the same label as fp32 on "
            f"{len(texts)} held-out verses: {kept}",
            flush=True,
        )
        atomic.write_json(Path(cfg.paths.metrics) / "quantize.json", report)
        tracking.log_metrics(report)


if __name__ == "__main__":
    raise SystemExit(run_stage("quantize", SECTIONS, main))
