"""Stage `quantize`: ONNX Runtime int8 quantization of the exported models in `quantize.variants` (dynamic by
default; static calibrates activations on windows of the val split).

Outs: <paths.onnx>/<variant>-int8/ (a servable ONNX dir like its source), <paths.metrics>/quantize.json.
"""

from pathlib import Path

from lmpipe import atomic, config, tracking
from lmpipe.stage import run_stage

SECTIONS = ("paths", "quantize", "logger")


def main(cfg):
    from lmpipe.compress import quantize_onnx
    from lmpipe.tokenizer import read_shard

    qcfg = config.build(cfg.quantize)
    onnx = Path(cfg.paths.onnx)
    calibration = read_shard(cfg.paths.tokens, "val") if qcfg.method == "static" else None
    report = {}
    with tracking.stage_run("quantize", cfg, SECTIONS):
        for variant in qcfg.variants:
            report[variant] = quantize_onnx(onnx / variant, onnx / f"{variant}-int8", qcfg, calibration)
            print(f"quantize: {variant}-int8 is {report[variant]['ratio']:.2f}x the fp32 file", flush=True)
        atomic.write_json(Path(cfg.paths.metrics) / "quantize.json", report)
        tracking.log_metrics(report)


if __name__ == "__main__":
    raise SystemExit(run_stage("quantize", SECTIONS, main))
