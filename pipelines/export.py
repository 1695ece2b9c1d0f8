"""Stage `export`: each model in `export.models` to one self-contained ONNX file with a KV cache (inputs: token
ids, positions, attention mask, past keys/values; outputs: logits, present keys/values), checked against PyTorch
on prefill and cached decode. With `prune.sparsity` > 0 the fine-tuned model is also magnitude-pruned first and
exported as `<prune.source>-pruned`, so its quality cost shows up in `evaluate`.

Outs: <paths.onnx>/<variant>/ (model.onnx, config.json, parity.json, tokenizer files), <paths.metrics>/export.json.
"""

import tempfile
from pathlib import Path

from lmpipe import atomic, config, tracking
from lmpipe.stage import run_stage

SECTIONS = ("seed", "paths", "export", "prune", "logger")


def main(cfg):
    from lmpipe.compress import prune_model
    from lmpipe.export import export_onnx
    from lmpipe.formats import MODEL_FILE
    from lmpipe.model import load_model
    from lmpipe.training.outputs import write_model_dir

    ecfg, pcfg = config.build(cfg.export), config.build(cfg.prune)
    models, onnx = Path(cfg.paths.models), Path(cfg.paths.onnx)
    report = {}
    with tracking.stage_run("export", cfg, SECTIONS):
        for variant, source in ecfg.models.items():
            report[variant] = export_onnx(models / source, onnx / variant, ecfg, cfg.seed, variant)
            print(
                f"export: {variant}: parity prefill {report[variant]['prefill_max_abs_diff']:.1e}, "
                f"decode {report[variant]['decode_max_abs_diff']:.1e}",
                flush=True,
            )
        if pcfg.sparsity > 0:
            variant = f"{'teacher' if pcfg.source == 'sft' else pcfg.source}-pruned"
            model, extra = load_model(models / pcfg.source / MODEL_FILE)
            sparsity = prune_model(model, pcfg)
            with tempfile.TemporaryDirectory() as tmp:
                pruned_dir = write_model_dir(
                    Path(tmp) / variant, model, {**extra, "pruning": sparsity}, models / pcfg.source, []
                )
                report[variant] = {
                    **export_onnx(pruned_dir, onnx / variant, ecfg, cfg.seed, variant),
                    "pruning": sparsity,
                }
        atomic.write_json(Path(cfg.paths.metrics) / "export.json", report)
        tracking.log_metrics(report)


if __name__ == "__main__":
    raise SystemExit(run_stage("export", SECTIONS, main))
