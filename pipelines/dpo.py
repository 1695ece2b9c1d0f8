"""Stage `dpo`: Direct Preference Optimization of the SFT model on the preference pairs, against the frozen SFT
model as reference (`dpo.beta`, response tokens only). Writes a model directory like `sft`'s, so export,
quantize and evaluate take it.

Outs: <paths.models>/dpo/, <paths.metrics>/dpo.json, <paths.plots>/dpo/; persistent checkpoints in
<paths.checkpoints>/dpo/.
"""

from lmpipe import tracking
from lmpipe.stage import run_stage

SECTIONS = ("seed", "paths", "optimizer", "trainer", "perf", "logger", "dpo")


def main(cfg):
    import mlflow

    from lmpipe.formats import SAMPLES_FILE
    from lmpipe.text_samples import format_samples
    from lmpipe.training.dpo import train_dpo
    from lmpipe.training.post_outputs import write_policy_outputs

    with tracking.stage_run("dpo", cfg, SECTIONS) as run:
        result = train_dpo(cfg, run)
        if result is None:  # a DDP worker process
            return
        write_policy_outputs(cfg, "dpo", cfg.dpo.policy, result)
        tracking.log_metrics(result.metrics, prefix="final")
        mlflow.log_text(format_samples(result.samples), SAMPLES_FILE)
        test = result.metrics["test"]
        print(
            f"dpo: {result.metrics['steps']} steps, test reward accuracy {test['overall']['accuracy']:.3f}, "
            f"margin {test['reward_margin']:.3f}"
        )


if __name__ == "__main__":
    raise SystemExit(run_stage("dpo", SECTIONS, main))
