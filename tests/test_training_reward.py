import pytest
import torch
from post_training_inputs import make_inputs, post_config

from lmpipe.errors import LmpipeError
from lmpipe.formats import REWARD_HEAD_FILE
from lmpipe.training.outputs import write_model_dir
from lmpipe.training.reward import bradley_terry, load_reward_model, save_reward_head, train_reward

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TARGET = "lmpipe.training.post_configs.RewardConfig"
FIELDS = {
    "max_steps": 30,
    "batch_size": 8,
    "lr": 3e-3,
    "warmup_steps": 2,
    "val_check_interval": 10,
    "limit_val_batches": 1,
    "checkpoint_every_n_steps": 10,
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("reward_inputs"))


def test_bradley_terry_loss_and_accuracy():
    loss, accuracy = bradley_terry(torch.tensor([2.0, 0.0, 0.0, 1.0]))
    expected = (
        -(
            torch.nn.functional.logsigmoid(torch.tensor(2.0))
            + torch.nn.functional.logsigmoid(torch.tensor(-1.0))
        )
        / 2
    )
    assert torch.isclose(loss, expected) and accuracy == 0.5


def test_reward_model_learns_the_preference_and_reports_accuracy_per_task_and_kind(
    tiny_config, inputs, tmp_path
):
    result = train_reward(post_config(tiny_config, inputs, tmp_path, "reward", TARGET, **FIELDS))
    test = result.metrics["test"]
    assert test["overall"]["accuracy"] == 1.0 and test["overall"]["pairs"] == 8
    assert set(test["per_kind"]) == {"random", "on_policy"}
    assert set(test["per_task"]) == {"testament", "book"}
    assert (
        result.metrics["steps"] == 30
        and result.curves["train_loss"][-1][1] < result.curves["train_loss"][0][1]
    )

    out = write_model_dir(
        tmp_path / "reward",
        result.model.backbone,
        {"stage": "reward"},
        inputs.models / "sft",
        [],
        also=lambda tmp: save_reward_head(tmp / REWARD_HEAD_FILE, result.model),
    )
    loaded = load_reward_model(out)
    ids, lengths = torch.tensor([[7, 8, 9, 1]]), torch.tensor([4])
    assert torch.allclose(loaded(ids, lengths), result.model(ids, lengths))
    with pytest.raises(LmpipeError, match="not a reward model directory"):
        load_reward_model(inputs.models / "sft")
