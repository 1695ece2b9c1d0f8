import pytest
import torch
from post_training_inputs import make_inputs, post_config, refuses_a_reference_with_another_tokenizer

from lmpipe.formats import REWARD_HEAD_FILE
from lmpipe.model import load_model
from lmpipe.training import core
from lmpipe.training.outputs import write_model_dir
from lmpipe.training.policy import RewardModel
from lmpipe.training.reward import save_reward_head
from lmpipe.training.rl import group_advantages, train_rl

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TARGET = "lmpipe.training.post_configs.RLConfig"
FIELDS = {
    "max_steps": 8,
    "prompts_per_step": 4,
    "group_size": 4,
    "max_new_tokens": 4,
    "lr": 3e-3,
    "warmup_steps": 1,
    "val_check_interval": 4,
    "limit_val_batches": 1,
    "checkpoint_every_n_steps": 3,
    "num_samples": 1,
    "sample_tokens": 4,
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    inputs = make_inputs(tmp_path_factory.mktemp("rl_inputs"))
    backbone = load_model(inputs.models / "sft" / "model.pt")[0]
    reward = RewardModel(backbone)
    torch.nn.init.normal_(reward.head.weight, generator=torch.Generator().manual_seed(0))
    write_model_dir(
        inputs.models / "reward",
        backbone,
        {"stage": "reward"},
        inputs.models / "sft",
        [],
        also=lambda tmp: save_reward_head(tmp / REWARD_HEAD_FILE, reward),
    )
    return inputs


def test_group_advantages_are_normalised_within_each_prompt():
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [5.0, 5.0, 5.0, 5.0]]))
    assert torch.allclose(adv[0].mean(), torch.tensor(0.0)) and adv[0, 0] > 0 > adv[0, 1]
    assert torch.equal(adv[1], torch.zeros(4))  # a group with one reward teaches nothing


def test_a_reference_with_another_tokenizer_is_a_one_line_error(tiny_config, inputs, tmp_path):
    cfg = post_config(tiny_config, inputs, tmp_path, "rl", TARGET, **FIELDS)
    refuses_a_reference_with_another_tokenizer(train_rl, cfg, inputs, tmp_path, "rl")


def test_rl_logs_reward_kl_and_length_per_step_and_is_seeded(tiny_config, inputs, tmp_path):
    a = train_rl(post_config(tiny_config, inputs, tmp_path / "a", "rl", TARGET, **FIELDS))
    for key in ("train_reward", "train_kl", "train_response_length"):
        assert [step for step, _ in a.curves[key]] == list(range(1, 9))
    assert a.curves["train_kl"][0][1] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
    assert all(0 < length <= 4 for _, length in a.curves["train_response_length"])
    b_cfg = post_config(tiny_config, inputs, tmp_path / "b", "rl", TARGET, **FIELDS)
    b_cfg.perf.compile = True  # the loss stays eager (EagerLoss): it samples inside, and shapes vary
    b = train_rl(b_cfg)
    assert a.curves == b.curves
    exact = train_rl(
        post_config(tiny_config, inputs, tmp_path / "c", "rl", TARGET, **FIELDS, reward="exact_match")
    )
    assert exact.metrics["reward"] == "exact_match"
    assert [r for _, r in exact.curves["train_reward"]] == [m for _, m in exact.curves["train_exact_match"]]


class Killed(Exception):
    pass


class KillAt(core.L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 5:
            raise Killed


def test_an_interrupted_run_resumes_to_identical_weights(tiny_config, inputs, tmp_path, monkeypatch):
    def run(root, *callbacks):
        monkeypatch.setattr(core, "progress_callbacks", lambda every: (list(callbacks), False))
        return train_rl(post_config(tiny_config, inputs, root, "rl", TARGET, **FIELDS))

    full = run(tmp_path / "full")
    with pytest.raises(Killed):
        run(tmp_path / "killed", KillAt())
    resumed = run(tmp_path / "killed")
    assert resumed.metrics["resumed"] is True
    for name, weight in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], weight), name
    assert resumed.curves["train_reward"] == full.curves["train_reward"]
