"""The reinforcement-learning step after SFT: a policy-gradient stage with GRPO-style group-normalised
advantages (Shao et al., 2024) and a KL penalty against the frozen SFT reference.

Each optimizer step draws `prompts_per_step` prompts of the preference train pairs (seeded, resumable) and
samples `group_size` responses to each from the current policy (seeded by the run's seed and the step, so a
resumed run samples what an uninterrupted one would). Each response is scored by the reward model
(`rl.reward=model`, the reward stage's output) or by exact match with the label (`exact_match`: 1 if the
response is the right label and closes its turn, else 0). Within a prompt's group the advantages are

    A_i = (r_i - mean(r)) / (std(r) + 1e-4),

so the policy learns which of its own answers beat its other answers, whatever the reward's scale. The loss
over the sampled responses y_i (their tokens t, the closing `<|end|>` included) is

    L = -mean_i [ A_i * mean_t log pi(y_it | x, y_i<t) ] + kl_coef * mean_i mean_t k3_it,
    k3 = exp(log ref - log pi) - (log ref - log pi) - 1 >= 0,

the unbiased, always non-negative KL(pi || ref) estimator of GRPO. One gradient step per sample set (so the
PPO ratio is 1 and needs no clipping). Logged per step: mean reward, KL, response length, exact match.
Checkpoints go to `<paths.checkpoints>/rl/` (the reference and reward model stay out of them).
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from lmpipe import config
from lmpipe.data.instructions import encode_prompt
from lmpipe.data.preferences import read_pairs
from lmpipe.errors import LmpipeError
from lmpipe.formats import END, MODEL_FILE, TOKENIZER_FILE
from lmpipe.model import GPT
from lmpipe.tokenizer import tokenizer_hash
from lmpipe.training.checkpointing import digest, file_sha256
from lmpipe.training.configs import OptimizerConfig
from lmpipe.training.core import FitPlan, TrainingModule, TrainResult, fit
from lmpipe.training.datamodules import ResumableBatches
from lmpipe.training.policy import RewardModel, disable_dropout, response_mask, sample_ids, token_logprobs
from lmpipe.training.post_configs import RLConfig
from lmpipe.training.preference_data import (
    EagerLoss,
    FrozenOutOfCheckpoints,
    load_policy_pair,
    pad_id_of,
    pair_samples,
)
from lmpipe.training.reward import load_reward_model
from lmpipe.training.streams import BatchStream, StreamSpec

REWARD_DIR = "reward"
"""The reward stage's model directory under paths.models."""


class PromptBatches(BatchStream):
    """`prompts_per_step` random prompt indices per batch."""

    def __init__(self, n_prompts: int, per_batch: int, spec: StreamSpec):
        super().__init__(spec)
        self.n_prompts, self.per_batch = n_prompts, per_batch

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        picks = self.rng(index).integers(0, self.n_prompts, size=self.per_batch)
        return {"prompt": torch.from_numpy(picks), "index": torch.tensor(index)}


class PromptDataModule(ResumableBatches, L.LightningDataModule):
    """Random training prompts (resumable) and fixed validation prompts (index = -1 - batch, so their sampling
    seeds never collide with a training step's)."""

    def __init__(self, n_train: int, n_val: int, per_batch: int, seed: int):
        super().__init__()
        self.n_train, self.n_val, self.per_batch, self.seed = n_train, n_val, per_batch, seed

    def train_dataloader(self) -> DataLoader:
        spec = self.stream_spec(
            self.seed, max(1, math.ceil(self.n_train / (self.per_batch * self.world_size)))
        )
        return self.loader(PromptBatches(self.n_train, self.per_batch, spec))

    def val_dataloader(self) -> DataLoader:
        batches = [
            {
                "prompt": torch.arange(start, min(start + self.per_batch, self.n_val)),
                "index": torch.tensor(-1 - b),
            }
            for b, start in enumerate(range(0, self.n_val, self.per_batch))
        ]
        return self.loader(batches, batch_size=None)


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """(P, G) rewards -> advantages normalised within each row (a prompt's group)."""
    return (rewards - rewards.mean(dim=1, keepdim=True)) / (rewards.std(dim=1, keepdim=True) + 1e-4)


def pad_sequences(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
    return ids, torch.tensor([len(s) for s in sequences])


class LitRL(EagerLoss, FrozenOutOfCheckpoints, TrainingModule):
    frozen_attributes = ("reference", "reward_model")

    def __init__(
        self,
        policy: GPT,
        reference: GPT,
        reward_model: RewardModel | None,
        prompts: dict[str, list[list[int]]],
        answers: dict[str, list[list[int]]],
        optimizer: OptimizerConfig,
        cfg: RLConfig,
        seed: int,
        end_id: int,
        pad_id: int,
    ):
        super().__init__(optimizer, cfg, cfg.max_steps)
        self.cfg, self.seed, self.end_id, self.pad_id = cfg, seed, end_id, pad_id
        self.policy = disable_dropout(policy).requires_grad_(True)
        self.reference = reference.requires_grad_(False)
        self.reward_model = reward_model if reward_model is not None else torch.nn.Identity()
        self.prompts, self.answers = prompts, answers
        self.train()

    def param_groups(self, weight_decay: float) -> list[dict]:
        return self.policy.param_groups(weight_decay)

    def rollout(self, split: str, batch: dict) -> dict[str, torch.Tensor]:
        """Sample the groups of one batch of prompts and score them: sequences, masks, rewards, exact match."""
        g = self.cfg.group_size
        picks = batch["prompt"].tolist()
        prompts = [self.prompts[split][i] for i in picks]
        generator = torch.Generator().manual_seed(
            int(np.random.SeedSequence([self.seed, int(batch["index"]) + 2**31]).generate_state(1)[0])
        )
        responses = sample_ids(
            self.policy, prompts, g, self.cfg.max_new_tokens, self.cfg.temperature, generator, self.end_id
        )
        prompt_of = [prompts[k // g] for k in range(len(responses))]
        ids, lengths = pad_sequences([p + r for p, r in zip(prompt_of, responses, strict=True)], self.pad_id)
        prompt_lengths = torch.tensor([len(p) for p in prompt_of])
        exact = torch.tensor(
            [float(r == self.answers[split][picks[k // g]]) for k, r in enumerate(responses)]
        )
        if self.cfg.reward == "exact_match":
            rewards = exact
        else:  # the reward model scores the response closed with <|end|>, as it was trained
            closed = [
                p + [t for t in r if t != self.end_id] + [self.end_id]
                for p, r in zip(prompt_of, responses, strict=True)
            ]
            with torch.no_grad():
                rewards = self.reward_model(*pad_sequences(closed, self.pad_id)).float()
        return {
            "ids": ids,
            "mask": response_mask(lengths, prompt_lengths, ids.shape[1] - 1),
            "rewards": rewards.view(-1, g),
            "exact": exact,
            "length": torch.tensor([float(len(r)) for r in responses]),
        }

    def objective(self, split: str, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.rollout(split, batch)
        ids, mask = out["ids"], out["mask"].float()
        logps = token_logprobs(self.policy(ids[:, :-1]).logits, ids)
        with torch.no_grad():
            ref_logps = token_logprobs(self.reference(ids[:, :-1]).logits, ids)
        tokens = mask.sum(dim=1).clamp(min=1)
        log_ratio = ref_logps - logps
        kl = ((torch.exp(log_ratio) - log_ratio - 1) * mask).sum(dim=1) / tokens
        advantages = group_advantages(out["rewards"]).reshape(-1)
        policy_term = -(advantages * (logps * mask).sum(dim=1) / tokens)
        loss = (policy_term + self.cfg.kl_coef * kl).mean()
        logged = {
            "reward": out["rewards"].mean(),
            "kl": kl.mean().detach(),
            "response_length": out["length"].mean(),
            "exact_match": out["exact"].mean(),
        }
        return loss, logged

    def training_loss(self, batch):
        loss, logged = self.objective("train", batch)
        return loss, {"train_loss": loss, **{f"train_{k}": v for k, v in logged.items()}}

    def validation_losses(self, batch):
        # The policy-gradient objective is no loss to watch (its scale moves with the advantages and it is
        # often negative); val_loss is the policy's cross-entropy on the right answers to the val prompts.
        _, logged = self.objective("val", batch)
        picks = batch["prompt"].tolist()
        prompts = [self.prompts["val"][i] for i in picks]
        ids, lengths = pad_sequences(
            [p + self.answers["val"][i] for p, i in zip(prompts, picks, strict=True)], self.pad_id
        )
        mask = response_mask(lengths, torch.tensor([len(p) for p in prompts]), ids.shape[1] - 1).float()
        nll = -(token_logprobs(self.policy(ids[:, :-1]).logits, ids) * mask).sum() / mask.sum()
        n = len(picks)
        return {"val_loss": (nll, n), **{f"val_{k}": (v, n) for k, v in logged.items()}}


class StepCurves(L.Callback):
    """(step, value) of the per-step RL metrics at every logging step; rides in checkpoints like LossHistory."""

    KEYS = (
        "train_reward",
        "train_kl",
        "train_response_length",
        "train_exact_match",
        "val_reward",
        "val_exact_match",
        "val_kl",
    )

    def __init__(self):
        self.curves: dict[str, list[tuple[int, float]]] = {key: [] for key in self.KEYS}

    def _record(self, trainer, keys):
        for key in keys:
            value = trainer.callback_metrics.get(key)
            if value is not None:
                self.curves[key].append((trainer.global_step, float(value)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer._logger_connector.should_update_logs:
            self._record(trainer, [k for k in self.KEYS if k.startswith("train_")])

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._record(trainer, [k for k in self.KEYS if k.startswith("val_")])

    def state_dict(self) -> dict:
        return {"curves": self.curves}

    def load_state_dict(self, state: dict) -> None:
        self.curves = {key: [tuple(p) for p in curve] for key, curve in state["curves"].items()}


def train_rl(cfg: DictConfig, run=None) -> TrainResult | None:
    """The RL step from `<paths.models>/<rl.policy>` with `<rl.reference>` as KL reference, on the prompts of
    `<paths.preferences>`; None in DDP worker processes."""
    rcfg: RLConfig = config.build(cfg.rl)
    optim_cfg = rcfg.optimizer(cfg.optimizer)
    models = Path(cfg.paths.models)
    policy, reference, tokenizer, template, policy_dir = load_policy_pair(
        models, rcfg.policy, rcfg.reference, "rl"
    )
    pad_id, end_id = pad_id_of(tokenizer, policy_dir), tokenizer.token_to_id(END)
    reward_model, reward_sha256 = None, None
    if rcfg.reward == "model":
        reward_dir = models / REWARD_DIR
        if tokenizer_hash(reward_dir / TOKENIZER_FILE) != tokenizer_hash(policy_dir / TOKENIZER_FILE):
            raise LmpipeError(
                f"{reward_dir}: the reward model's tokenizer differs from the policy's ({policy_dir})"
            )
        reward_model = load_reward_model(reward_dir)
        reward_sha256 = file_sha256(reward_dir / MODEL_FILE)
    pairs = {split: _unique_prompts(read_pairs(cfg.paths.preferences, split)) for split in ("train", "val")}
    # The pairs come grouped by task; validation reads the first prompts, so put them in one seeded order.
    order = np.random.default_rng(cfg.seed).permutation(len(pairs["val"]))
    pairs["val"] = [pairs["val"][i] for i in order]
    prompts = {
        s: [encode_prompt(tokenizer, template, p["prompt"]) for p in part] for s, part in pairs.items()
    }
    answers = {s: [tokenizer.encode(p["chosen"] + END).ids for p in part] for s, part in pairs.items()}
    n_val = min(len(prompts["val"]), rcfg.prompts_per_step * rcfg.limit_val_batches)

    curves = StepCurves()
    plan = FitPlan(
        name="rl",
        build_module=lambda: LitRL(
            policy, reference, reward_model, prompts, answers, optim_cfg, rcfg, cfg.seed, end_id, pad_id
        ),
        datamodule=PromptDataModule(len(prompts["train"]), n_val, rcfg.prompts_per_step, cfg.seed),
        trainer=rcfg.trainer(cfg.trainer),
        checkpoint_every_n_steps=rcfg.checkpoint_every_n_steps,
        shaping={
            "optimizer": optim_cfg,
            "rl": rcfg.shaping(),
            "policy": file_sha256(policy_dir / MODEL_FILE),
            "reference": file_sha256(models / rcfg.reference / MODEL_FILE),
            "reward_model": reward_sha256,
            "data": digest({"prompts": prompts, "answers": answers}),
        },
        callbacks=[curves],
    )
    fitted = fit(plan, cfg, run)
    if fitted is None:
        return None
    model = fitted.module.policy.float().eval()
    kept = {key: curve for key, curve in curves.curves.items() if curve}
    metrics = {
        **fitted.metrics(),
        "reward": rcfg.reward,
        "train_prompts": len(prompts["train"]),
        **{f"last_{key}": curve[-1][1] for key, curve in kept.items()},
    }
    samples = pair_samples(
        model, tokenizer, template, pairs["val"], rcfg.num_samples, rcfg.sample_tokens, cfg.seed
    )
    model.requires_grad_(True)  # a plain GPT, as load_model returns it
    return TrainResult(model, metrics, {**fitted.curves, **kept}, samples)


def _unique_prompts(pairs: list[dict]) -> list[dict]:
    """One pair per prompt (the first), so every prompt is drawn equally often."""
    seen: dict[str, dict] = {}
    for pair in pairs:
        seen.setdefault(pair["prompt"], pair)
    return list(seen.values())
