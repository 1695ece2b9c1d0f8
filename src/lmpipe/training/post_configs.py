"""The config schemas of the post-training stages after SFT: `reward` (a reward model on preference pairs),
`dpo` (Direct Preference Optimization) and `rl` (a policy-gradient step against the reward model).

Each inherits `FinetuneSchedule` (its own steps, learning rate and validation cadence) like `sft`. Nothing here
imports torch or Lightning, so `--help` and config checks stay fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from lmpipe import config
from lmpipe.errors import LmpipeError
from lmpipe.training.configs import FinetuneSchedule, Positive, Samples

PositiveFloat = Annotated[float, Field(gt=0)]


def _model_dir_name(section: str, field: str, value: str) -> None:
    if not value or Path(value).name != value:
        raise LmpipeError(
            f"{section}.{field}={value!r}: expected a model directory name under paths.models (e.g. sft)"
        )


@config.schema("reward")
class RewardConfig(FinetuneSchedule):
    base: str = "sft"
    """Model directory under paths.models whose GPT is the reward model's backbone."""
    batch_size: Positive = 16
    """Preference pairs per micro-batch (each pair is two sequences)."""

    def __post_init__(self):
        _model_dir_name("reward", "base", self.base)


@config.schema("dpo")
class DPOConfig(FinetuneSchedule, Samples):
    policy: str = "sft"
    """Model directory under paths.models the policy starts from."""
    reference: str = "sft"
    """Model directory under paths.models of the frozen reference (same tokenizer as the policy)."""
    beta: PositiveFloat = 0.1
    """Strength of the implicit KL constraint: the loss is -log sigmoid(beta * (policy - reference log-ratio margin))."""
    batch_size: Positive = 16
    """Preference pairs per micro-batch (each pair is two sequences)."""

    def __post_init__(self):
        _model_dir_name("dpo", "policy", self.policy)
        _model_dir_name("dpo", "reference", self.reference)


@config.schema("rl")
class RLConfig(FinetuneSchedule, Samples):
    policy: str = "sft"
    """Model directory under paths.models the policy starts from."""
    reference: str = "sft"
    """Model directory under paths.models of the frozen KL reference (same tokenizer as the policy)."""
    reward: Literal["model", "exact_match"] = "model"
    """Score of a sampled response: the reward model's (paths.models/reward) or 1/0 exact match with the label."""
    prompts_per_step: Positive = 4
    """Prompts (from the preference train pairs) per optimizer step."""
    group_size: Annotated[int, Field(ge=2)] = 8
    """Responses sampled per prompt; advantages are rewards normalised within each prompt's group (GRPO)."""
    kl_coef: Annotated[float, Field(ge=0)] = 0.05
    """Weight of the per-token KL penalty against the reference (k3 estimator)."""
    temperature: PositiveFloat = 1.0
    """Softmax temperature of the sampled responses."""
    max_new_tokens: Positive = 8
    """Most tokens per sampled response (label answers are a few tokens and `<|end|>`)."""

    def __post_init__(self):
        _model_dir_name("rl", "policy", self.policy)
        _model_dir_name("rl", "reference", self.reference)
