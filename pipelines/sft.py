"""Stage `sft`: supervised fine-tuning of the pretrained GPT on the instruction examples, by `sft.method`:
`full` (all weights), `lora` (low-rank adapters, merged at the end) or `head` (frozen backbone plus new
classification heads: transfer learning).

Outs: <paths.sft>/ (model.pt, heads.pt for method=head, tokenizer files, samples.txt),
<paths.metrics>/sft.json, <paths.plots>/sft/{train,val}_loss.csv; persistent checkpoints in
<paths.checkpoints>/sft/.
"""

from pathlib import Path

from lmpipe import atomic, tracking
from lmpipe.stage import run_stage

SECTIONS = ("seed", "paths", "optimizer", "trainer", "perf", "logger", "sft")


def main(cfg):
    import mlflow

    from lmpipe.data.instructions import read_label_sets
    from lmpipe.formats import HEADS_FILE, SAMPLES_FILE
    from lmpipe.text_samples import format_samples
    from lmpipe.training.heads import save_heads
    from lmpipe.training.outputs import write_curves, write_model_dir
    from lmpipe.training.sft import finetune

    with tracking.stage_run("sft", cfg, SECTIONS) as run:
        result = finetune(cfg, run)
        if result is None:  # a DDP worker process
            return
        label_sets = read_label_sets(cfg.paths.instructions)

        def add_heads(tmp: Path) -> None:
            if result.heads is not None:
                heads_sets = {task: label_sets[task] for task in cfg.sft.head_tasks}
                save_heads(tmp / HEADS_FILE, result.heads, heads_sets, result.model.config.n_embd)

        extra = {"stage": "sft", "method": result.method, "metrics": result.metrics}
        model_dir = write_model_dir(
            Path(cfg.paths.sft),
            result.model,
            extra,
            Path(cfg.paths.models) / "pretrain",
            result.samples,
            also=add_heads,
        )
        write_curves(Path(cfg.paths.plots) / "sft", result.curves)
        atomic.write_json(Path(cfg.paths.metrics) / "sft.json", result.metrics)

        tracking.log_metrics(result.metrics, prefix="final")
        mlflow.set_tags({"sft_method": result.method, "fit_verdict": result.metrics["fit"]["verdict"]})
        mlflow.log_text(format_samples(result.samples), SAMPLES_FILE)
        mlflow.log_artifacts(str(model_dir), "model")
        print(
            f"sft: method={result.method} {result.metrics['steps']} steps, val loss "
            f"{result.metrics['val_loss']} -> {model_dir}"
        )


if __name__ == "__main__":
    raise SystemExit(run_stage("sft", SECTIONS, main))
