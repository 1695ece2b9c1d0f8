"""A reward model: the SFT model's GPT backbone with a scalar head (`lmpipe.training.policy.RewardModel`),
trained on preference pairs with the Bradley-Terry loss

    L = -log sigmoid(r(x, y_chosen) - r(x, y_rejected)),

the negative log-likelihood of the observed preference when P(chosen beats rejected) = sigmoid of the reward
difference. Every weight trains (the backbone too). The test metric is pairwise accuracy, the share of test
pairs whose chosen response scores higher, overall, per task and per kind of negative (`random`,
`on_policy`). Checkpoints go to `<paths.checkpoints>/reward/`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from lmpipe import config
from lmpipe.chat import load_chat_template
from lmpipe.errors import LmpipeError
from lmpipe.formats import MODEL_FILE, REWARD_HEAD_FILE, TOKENIZER_FILE
from lmpipe.model import load_model
from lmpipe.tokenizer import load_tokenizer
from lmpipe.training.checkpointing import file_sha256
from lmpipe.training.configs import OptimizerConfig
from lmpipe.training.core import FitPlan, TrainingModule, fit
from lmpipe.training.policy import RewardModel
from lmpipe.training.post_configs import RewardConfig
from lmpipe.training.preference_data import (
    EagerLoss,
    PairDataModule,
    grouped_accuracy,
    load_pair_rows,
    pad_id_of,
    pair_batches,
)
from lmpipe.training.sft_data import rows_sha256


def bradley_terry(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, accuracy) of (2B,) rewards whose first half scores the chosen responses."""
    chosen, rejected = rewards.chunk(2)
    return -F.logsigmoid(chosen - rejected).mean(), (chosen > rejected).float().mean()


class LitReward(EagerLoss, TrainingModule):
    def __init__(self, model: RewardModel, optimizer: OptimizerConfig, cfg: RewardConfig):
        super().__init__(optimizer, cfg, cfg.max_steps)
        self.model = model.requires_grad_(True)
        self.train()

    def param_groups(self, weight_decay: float) -> list[dict]:
        decay, rest = self.model.backbone.param_groups(weight_decay)
        head = self.model.head
        decay = {
            **decay,
            "params": [*decay["params"], head.weight],
            "param_names": [*decay["param_names"], "head.weight"],
        }
        rest = {
            **rest,
            "params": [*rest["params"], head.bias],
            "param_names": [*rest["param_names"], "head.bias"],
        }
        return [decay, rest]

    def training_loss(self, batch):
        loss, accuracy = bradley_terry(self.model(batch["input_ids"], batch["lengths"]))
        return loss, {"train_loss": loss, "train_accuracy": accuracy}

    def validation_losses(self, batch):
        loss, accuracy = bradley_terry(self.model(batch["input_ids"], batch["lengths"]))
        n = len(batch["task"])
        return {"val_loss": (loss, n), "val_accuracy": (accuracy, n)}


@torch.no_grad()
def pairwise_accuracy(
    model: RewardModel, rows: list[dict], pad_id: int, tasks, kinds, batch_size: int = 64
) -> dict:
    """`grouped_accuracy` of the reward model on every pair of `rows`, plus its mean reward margin."""
    model.eval()
    correct, task, kind, margins = [], [], [], []
    for batch in pair_batches(rows, batch_size, pad_id):
        chosen, rejected = model(batch["input_ids"], batch["lengths"]).chunk(2)
        correct.append(chosen > rejected)
        margins.append(chosen - rejected)
        task.append(batch["task"])
        kind.append(batch["kind"])
    result = grouped_accuracy(torch.cat(correct), torch.cat(task), torch.cat(kind), tasks, kinds)
    result["mean_margin"] = float(torch.cat(margins).mean())
    return result


@dataclass
class RewardResult:
    model: RewardModel
    metrics: dict
    curves: dict


def train_reward(cfg: DictConfig, run=None) -> RewardResult | None:
    """Train the reward model on `<paths.preferences>` pairs from `<paths.models>/<reward.base>`; returns None in
    DDP worker processes."""
    rcfg: RewardConfig = config.build(cfg.reward)
    optim_cfg = rcfg.optimizer(cfg.optimizer)
    base_dir = Path(cfg.paths.models) / rcfg.base
    backbone, _ = load_model(base_dir / MODEL_FILE)
    tokenizer = load_tokenizer(base_dir / TOKENIZER_FILE)
    template = load_chat_template(base_dir)
    pad_id = pad_id_of(tokenizer, base_dir)
    _, rows, tasks, kinds = load_pair_rows(cfg.paths.preferences, tokenizer, template)

    plan = FitPlan(
        name="reward",
        build_module=lambda: LitReward(RewardModel(backbone), optim_cfg, rcfg),
        datamodule=PairDataModule(rows["train"], rows["val"], rcfg.batch_size, cfg.seed, pad_id),
        trainer=rcfg.trainer(cfg.trainer),
        checkpoint_every_n_steps=rcfg.checkpoint_every_n_steps,
        shaping={
            "optimizer": optim_cfg,
            "reward": rcfg,
            "base": file_sha256(base_dir / MODEL_FILE),
            "data": rows_sha256({s: rows[s] for s in ("train", "val")}),
        },
    )
    fitted = fit(plan, cfg, run)
    if fitted is None:
        return None
    model = fitted.module.model.float().eval()
    metrics = {
        **fitted.metrics(),
        "train_pairs": len(rows["train"]),
        "test": pairwise_accuracy(model, rows["test"], pad_id, tasks, kinds),
    }
    return RewardResult(model, metrics, fitted.curves)


def save_reward_head(path: Path, model: RewardModel) -> None:
    torch.save({k: v.detach().clone() for k, v in model.head.state_dict().items()}, path)


def load_reward_model(model_dir: Path) -> RewardModel:
    """The reward model written by the reward stage (backbone model.pt + reward_head.pt), in eval mode."""
    backbone, extra = load_model(model_dir / MODEL_FILE)
    head_path = model_dir / REWARD_HEAD_FILE
    if extra.get("stage") != "reward" or not head_path.is_file():
        raise LmpipeError(
            f"{model_dir}: not a reward model directory (no {REWARD_HEAD_FILE}); run the reward stage"
        )
    model = RewardModel(backbone)
    model.head.load_state_dict(torch.load(head_path, map_location="cpu", weights_only=True))
    return model.eval().requires_grad_(False)
