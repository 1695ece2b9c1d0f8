import math

import pytest
import torch
from omegaconf import OmegaConf
from post_training_inputs import make_inputs, post_config, refuses_a_reference_with_another_tokenizer

from lmpipe import config
from lmpipe.errors import LmpipeError
from lmpipe.model import load_model
from lmpipe.training.dpo import dpo_terms, train_dpo
from lmpipe.training.policy import sequence_logprobs
from lmpipe.training.post_configs import DPOConfig
from lmpipe.training.preference_data import collate_pairs, encode_pairs

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TARGET = "lmpipe.training.post_configs.DPOConfig"
FIELDS = {
    "max_steps": 20,
    "batch_size": 8,
    "lr": 3e-3,
    "warmup_steps": 2,
    "val_check_interval": 10,
    "limit_val_batches": 1,
    "checkpoint_every_n_steps": 10,
    "num_samples": 1,
    "sample_tokens": 4,
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("dpo_inputs"))


def test_the_loss_starts_at_log2_and_counts_response_tokens_only(inputs):
    from lmpipe.chat import CHAT_TEMPLATE

    model = load_model(inputs.models / "sft" / "model.pt")[0]
    pairs = inputs.pairs["train"][:4]
    rows = encode_pairs(
        pairs, inputs.tokenizer, CHAT_TEMPLATE, ["book", "testament"], ["on_policy", "random"]
    )
    batch = collate_pairs(rows, pad_id=1)
    with torch.no_grad():
        terms = dpo_terms(model, model, batch, beta=0.1)
    assert (
        math.isclose(float(terms["loss"]), math.log(2), rel_tol=1e-5) and float(terms["reward_margin"]) == 0
    )
    # The summed log-prob is the direct sum over the response positions (the prompt and padding masked out).
    ids, n, p = batch["input_ids"][0], int(batch["lengths"][0]), int(batch["prompt_lengths"][0])
    logp = torch.log_softmax(model(ids[None, : n - 1]).logits[0].float(), -1)
    direct = sum(float(logp[t - 1, ids[t]]) for t in range(p, n))
    total = sequence_logprobs(
        model, batch["input_ids"][:1], batch["lengths"][:1], batch["prompt_lengths"][:1]
    )[0]
    assert math.isclose(float(total), direct, rel_tol=1e-5)


def test_dpo_learns_the_preference_and_writes_test_metrics(tiny_config, inputs, tmp_path):
    result = train_dpo(post_config(tiny_config, inputs, tmp_path, "dpo", TARGET, **FIELDS))
    test = result.metrics["test"]
    assert test["overall"]["accuracy"] == 1.0 and test["reward_margin"] > 0
    assert test["chosen_logps"] > test["rejected_logps"]
    assert set(test["per_kind"]) == {"random", "on_policy"} and result.metrics["beta"] == 0.1
    assert len(result.samples) == 1


@pytest.mark.parametrize("beta", [0.0, -0.1])
def test_beta_must_be_positive(beta):
    with pytest.raises(LmpipeError, match=rf"^dpo.beta={beta}: expected a value greater than 0"):
        config.build(OmegaConf.create({"_target_": TARGET, "beta": beta}))
    assert DPOConfig().beta == 0.1


def test_a_reference_with_another_tokenizer_is_a_one_line_error(tiny_config, inputs, tmp_path):
    cfg = post_config(tiny_config, inputs, tmp_path, "dpo", TARGET, **FIELDS)
    refuses_a_reference_with_another_tokenizer(train_dpo, cfg, inputs, tmp_path, "dpo")
