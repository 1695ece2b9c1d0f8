"""Stage `pretrain`: train the decoder-only GPT on the token shards (Lightning; resumes after interruption).

Outs: <paths.models>/pretrain/ (model.pt, tokenizer.json, tokenizer_config.json, samples.txt),
<paths.metrics>/pretrain.json, <paths.plots>/pretrain/{train,val}_loss.csv; persistent checkpoints in
<paths.checkpoints>/pretrain/.
"""

from pathlib import Path

from lmpipe import atomic, tracking
from lmpipe.stage import run_stage

SECTIONS = ("seed", "paths", "model", "optimizer", "trainer", "perf", "logger", "pretrain")


def main(cfg):
    import mlflow

    from lmpipe.formats import SAMPLES_FILE
    from lmpipe.text_samples import format_samples
    from lmpipe.training.outputs import write_curves, write_model_dir
    from lmpipe.training.pretrain import pretrain

    with tracking.stage_run("pretrain", cfg, SECTIONS) as run:
        result = pretrain(cfg, run)
        if result is None:  # a DDP worker process: the main process writes the outputs
            return
        extra = {"stage": "pretrain", "metrics": result.metrics}
        model_dir = write_model_dir(
            Path(cfg.paths.models) / "pretrain", result.model, extra, cfg.paths.tokens, result.samples
        )
        write_curves(Path(cfg.paths.plots) / "pretrain", result.curves)
        atomic.write_json(Path(cfg.paths.metrics) / "pretrain.json", result.metrics)

        tracking.log_metrics(result.metrics, prefix="final")
        mlflow.set_tag("fit_verdict", result.metrics["fit"]["verdict"])
        mlflow.log_text(format_samples(result.samples), SAMPLES_FILE)
        mlflow.log_artifacts(str(model_dir), "model")
        fit = result.metrics["fit"]
        print(
            f"pretrain: {result.metrics['steps']} steps, val loss {fit.get('final_val_loss', float('nan')):.4f}"
            f" ({fit['verdict']}) -> {model_dir}"
        )


if __name__ == "__main__":
    raise SystemExit(run_stage("pretrain", SECTIONS, main))
