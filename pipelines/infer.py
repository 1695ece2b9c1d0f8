"""Stage `infer`: batch generation with a registered (default `models:/lmpipe@champion`) or local ONNX model.

Prompts come from `infer.prompts` (text, one per line, or JSONL with "prompt"), by default the first
`infer.limit` held-out instruction examples. The run's stats (tokens/s, finish reasons) go to MLflow.

Outs: `infer.output`, by default <paths.generations> (JSONL: source, prompt, text, finish_reason, tokens,
latency_ms).
"""

from pathlib import Path

from lmpipe import config, tracking
from lmpipe.stage import run_stage

SECTIONS = ("paths", "infer", "logger")


def main(cfg):
    import mlflow

    from lmpipe.inference.batch import run_batch

    icfg = config.build(cfg.infer)
    output = Path(icfg.output or cfg.paths.generations)
    tracking_uri = config.build(cfg.logger).resolved_uri
    with tracking.stage_run("infer", cfg, SECTIONS):
        stats = run_batch(icfg, output, Path(cfg.paths.instructions), tracking_uri=tracking_uri)
        tracking.log_metrics(stats)
        mlflow.set_tag("lmpipe.model_dir", stats["model_dir"])
        mlflow.log_artifact(str(output))
    print(
        f"infer: {stats['prompts']} prompts, {stats['completion_tokens']} tokens at "
        f"{stats['tokens_per_s']:.0f} tok/s with {icfg.model} -> {output}"
    )


if __name__ == "__main__":
    raise SystemExit(run_stage("infer", SECTIONS, main))
