"""Direct Preference Optimization (Rafailov et al., 2023): the policy starts from the SFT model and learns the
preference pairs directly, against a frozen reference (the SFT model):

    L = -log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))))

with log-probabilities summed over the response tokens only (and the closing `<|end|>`), never the prompt.
beta * (log pi - log ref) is the implicit reward of a response; logged per step: the loss, the reward accuracy
(the share of pairs whose chosen response has the larger implicit reward), the reward margin and the mean
chosen and rejected log-probabilities under the policy. Checkpoints go to `<paths.checkpoints>/dpo/` (the
reference stays out of them).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from lmpipe import config
from lmpipe.formats import MODEL_FILE
from lmpipe.model import GPT
from lmpipe.training.checkpointing import file_sha256
from lmpipe.training.configs import OptimizerConfig
from lmpipe.training.core import FitPlan, TrainingModule, TrainResult, fit
from lmpipe.training.policy import disable_dropout, sequence_logprobs
from lmpipe.training.post_configs import DPOConfig
from lmpipe.training.preference_data import (
    EagerLoss,
    FrozenOutOfCheckpoints,
    PairDataModule,
    grouped_accuracy,
    load_pair_rows,
    load_policy_pair,
    pad_id_of,
    pair_batches,
    pair_samples,
)
from lmpipe.training.sft_data import rows_sha256


def dpo_terms(policy: GPT, reference: GPT, batch: dict, beta: float) -> dict[str, torch.Tensor]:
    """The DPO loss of a batch of pairs and what is logged of it; `correct` per pair for grouped metrics."""
    args = (batch["input_ids"], batch["lengths"], batch["prompt_lengths"])
    policy_logps = sequence_logprobs(policy, *args)[0]
    with torch.no_grad():
        reference_logps = sequence_logprobs(reference, *args)[0]
    chosen_logps, rejected_logps = policy_logps.chunk(2)
    ratios = (policy_logps - reference_logps).chunk(2)
    chosen_rewards, rejected_rewards = beta * ratios[0], beta * ratios[1]
    margin = chosen_rewards - rejected_rewards
    return {
        "loss": -F.logsigmoid(margin).mean(),
        "reward_accuracy": (margin > 0).float().mean(),
        "reward_margin": margin.mean(),
        "chosen_logps": chosen_logps.mean(),
        "rejected_logps": rejected_logps.mean(),
        "correct": (margin > 0).detach(),
    }


class LitDPO(EagerLoss, FrozenOutOfCheckpoints, TrainingModule):
    frozen_attributes = ("reference",)

    def __init__(self, policy: GPT, reference: GPT, optimizer: OptimizerConfig, cfg: DPOConfig):
        super().__init__(optimizer, cfg, cfg.max_steps)
        self.beta = cfg.beta
        self.policy = disable_dropout(policy).requires_grad_(True)
        self.reference = reference.requires_grad_(False)
        self.train()

    def param_groups(self, weight_decay: float) -> list[dict]:
        return self.policy.param_groups(weight_decay)

    def training_loss(self, batch):
        terms = dpo_terms(self.policy, self.reference, batch, self.beta)
        logged = {f"train_{k}": v for k, v in terms.items() if k not in ("loss", "correct")}
        return terms["loss"], {"train_loss": terms["loss"], **logged}

    def validation_losses(self, batch):
        terms = dpo_terms(self.policy, self.reference, batch, self.beta)
        n = len(batch["task"])
        return {
            "val_loss": (terms["loss"], n),
            "val_reward_accuracy": (terms["reward_accuracy"], n),
            "val_reward_margin": (terms["reward_margin"], n),
        }


@torch.no_grad()
def test_metrics(policy, reference, rows, pad_id, beta, tasks, kinds, batch_size: int = 64) -> dict:
    """Implicit-reward accuracy on test pairs (overall, per task, per kind) and the mean margin and log-probs."""
    correct, task, kind, sums = [], [], [], {"reward_margin": 0.0, "chosen_logps": 0.0, "rejected_logps": 0.0}
    for batch in pair_batches(rows, batch_size, pad_id):
        terms = dpo_terms(policy, reference, batch, beta)
        correct.append(terms["correct"])
        task.append(batch["task"])
        kind.append(batch["kind"])
        for key in sums:
            sums[key] += float(terms[key]) * len(batch["task"])
    result = grouped_accuracy(torch.cat(correct), torch.cat(task), torch.cat(kind), tasks, kinds)
    return {**result, **{key: value / len(rows) for key, value in sums.items()}}


def train_dpo(cfg: DictConfig, run=None) -> TrainResult | None:
    """DPO from `<paths.models>/<dpo.policy>` against `<dpo.reference>` on `<paths.preferences>`; None in DDP
    worker processes."""
    dcfg: DPOConfig = config.build(cfg.dpo)
    optim_cfg = dcfg.optimizer(cfg.optimizer)
    models = Path(cfg.paths.models)
    policy, reference, tokenizer, template, policy_dir = load_policy_pair(
        models, dcfg.policy, dcfg.reference, "dpo"
    )
    pad_id = pad_id_of(tokenizer, policy_dir)
    pairs, rows, tasks, kinds = load_pair_rows(cfg.paths.preferences, tokenizer, template)

    plan = FitPlan(
        name="dpo",
        build_module=lambda: LitDPO(policy, reference, optim_cfg, dcfg),
        datamodule=PairDataModule(rows["train"], rows["val"], dcfg.batch_size, cfg.seed, pad_id),
        trainer=dcfg.trainer(cfg.trainer),
        checkpoint_every_n_steps=dcfg.checkpoint_every_n_steps,
        shaping={
            "optimizer": optim_cfg,
            "dpo": dcfg.shaping(),
            "policy": file_sha256(policy_dir / MODEL_FILE),
            "reference": file_sha256(models / dcfg.reference / MODEL_FILE),
            "data": rows_sha256({s: rows[s] for s in ("train", "val")}),
        },
    )
    fitted = fit(plan, cfg, run)
    if fitted is None:
        return None
    model = fitted.module.policy.float().eval()
    metrics = {
        **fitted.metrics(),
        "beta": dcfg.beta,
        "train_pairs": len(rows["train"]),
        "test": test_metrics(model, reference, rows["test"], pad_id, dcfg.beta, tasks, kinds),
    }
    samples = pair_samples(
        model, tokenizer, template, pairs["test"], dcfg.num_samples, dcfg.sample_tokens, cfg.seed
    )
    model.requires_grad_(True)  # a plain GPT, as load_model returns it
    return TrainResult(model, metrics, fitted.curves, samples)
