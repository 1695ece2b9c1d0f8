"""Stage `reward`: a reward model (the SFT model's backbone with a scalar head) trained on the preference pairs
with the Bradley-Terry loss; pairwise accuracy on the test pairs per task and per kind of negative.

Outs: <paths.models>/reward/ (model.pt: the backbone, reward_head.pt, tokenizer files), <paths.metrics>/reward.json,
<paths.plots>/reward/; persistent checkpoints in <paths.checkpoints>/reward/.
"""

from pathlib import Path

from lmpipe import atomic, tracking
from lmpipe.stage import run_stage

SECTIONS = ("seed", "paths", "optimizer", "trainer", "perf", "logger", "reward")


def main(cfg):
    from lmpipe.formats import REWARD_HEAD_FILE
    from lmpipe.training.outputs import write_curves, write_model_dir
    from lmpipe.training.reward import save_reward_head, train_reward

    with tracking.stage_run("reward", cfg, SECTIONS) as run:
        result = train_reward(cfg, run)
        if result is None:  # a DDP worker process
            return
        extra = {"stage": "reward", "metrics": result.metrics}
        write_model_dir(
            Path(cfg.paths.models) / "reward",
            result.model.backbone,
            extra,
            Path(cfg.paths.models) / cfg.reward.base,
            [],
            also=lambda tmp: save_reward_head(tmp / REWARD_HEAD_FILE, result.model),
        )
        write_curves(Path(cfg.paths.plots) / "reward", result.curves)
        atomic.write_json(Path(cfg.paths.metrics) / "reward.json", result.metrics)
        tracking.log_metrics(result.metrics, prefix="final")
        test = result.metrics["test"]
        kinds = ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in test["per_kind"].items())
        print(f"reward: test pairwise accuracy {test['overall']['accuracy']:.3f} ({kinds})")


if __name__ == "__main__":
    raise SystemExit(run_stage("reward", SECTIONS, main))
