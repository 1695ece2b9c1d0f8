"""Stage `rl`: the reinforcement-learning step after SFT: GRPO-style policy gradient on responses sampled from
the current policy (seeded), scored by the reward model (or exact match, `rl.reward`), with a KL penalty against
the frozen SFT reference. Writes a model directory like `sft`'s, so export, quantize and evaluate take it.

Outs: <paths.models>/rl/, <paths.metrics>/rl.json, <paths.plots>/rl/ (per-step reward, KL, response length);
persistent checkpoints in <paths.checkpoints>/rl/.
"""

from lmpipe import tracking
from lmpipe.stage import run_stage

SECTIONS = ("seed", "paths", "optimizer", "trainer", "perf", "logger", "rl")


def main(cfg):
    import mlflow

    from lmpipe.formats import SAMPLES_FILE
    from lmpipe.text_samples import format_samples
    from lmpipe.training.post_outputs import write_policy_outputs
    from lmpipe.training.rl import train_rl

    with tracking.stage_run("rl", cfg, SECTIONS) as run:
        result = train_rl(cfg, run)
        if result is None:  # a DDP worker process
            return
        write_policy_outputs(cfg, "rl", cfg.rl.policy, result)
        tracking.log_metrics(result.metrics, prefix="final")
        mlflow.log_text(format_samples(result.samples), SAMPLES_FILE)
        m = result.metrics
        print(
            f"rl: {m['steps']} steps, last mean reward {m.get('last_train_reward')}, KL {m.get('last_train_kl')}"
        )


if __name__ == "__main__":
    raise SystemExit(run_stage("rl", SECTIONS, main))
