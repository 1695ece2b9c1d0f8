"""Stage `dpo`: Direct Preference Optimization of the SFT model on the preference pairs, against the frozen SFT
model as reference (`dpo.beta`, response tokens only). Writes a model directory like `sft`'s, so export,
quantize and evaluate take it.

Outs: <paths.models>/dpo/, <paths.metrics>/dpo.json, <paths.plots>/dpo/; persistent checkpoints in
<paths.checkpoints>/dpo/.
"""

from pathlib import Path

from lmpipe import atomic, tracking
from lmpipe.stage import run_stage

SECTIONS = ("seed", "paths", "optimizer", "trainer", "perf", "logger", "dpo")


def main(cfg):
    import mlflow

    from lmpipe.formats import SAMPLES_FILE
    from lmpipe.text_samples import format_samples
    from lmpipe.training.dpo import train_dpo
    from lmpipe.training.outputs import write_curves, write_model_dir

    with tracking.stage_run("dpo", cfg, SECTIONS) as run:
        result = train_dpo(cfg, run)
        if result is None:  # a DDP worker process
            return
        extra = {"stage": "dpo", "metrics": result.metrics}
        policy_dir = Path(cfg.paths.models) / cfg.dpo.policy
        write_model_dir(Path(cfg.paths.models) / "dpo", result.model, extra, policy_dir, result.samples)
        write_curves(Path(cfg.paths.plots) / "dpo", result.curves)
        atomic.write_json(Path(cfg.paths.metrics) / "dpo.json", result.metrics)
        tracking.log_metrics(result.metrics, prefix="final")
        mlflow.log_text(format_samples(result.samples), SAMPLES_FILE)
        test = result.metrics["test"]
        print(
            f"dpo: {result.metrics['steps']} steps, test reward accuracy {test['overall']['accuracy']:.3f}, "
            f"margin {test['reward_margin']:.3f}"
        )


if __name__ == "__main__":
    raise SystemExit(run_stage("dpo", SECTIONS, main))
