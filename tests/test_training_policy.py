import pytest
import torch
from tiny_models import make_model_dir, tiny_tokenizer

from lmpipe.training.policy import RewardModel, response_mask, sample_ids, sequence_logprobs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tok = tiny_tokenizer()
    return make_model_dir(tmp_path_factory.mktemp("policy") / "m", tok, pos_encoding="rotary", std=0.3)


def test_left_padded_batch_sampling_matches_one_prompt_at_a_time(model):
    prompts = [[7, 8, 9], [10, 11, 12, 13, 14, 15], [16]]
    # Greedy-like (a very low temperature): the same tokens whatever the batch around a prompt.
    together = sample_ids(model, prompts, 2, 5, 1e-4, torch.Generator().manual_seed(0), end_id=5)
    alone = [
        r for p in prompts for r in sample_ids(model, [p], 2, 5, 1e-4, torch.Generator().manual_seed(0), 5)
    ]
    assert together == alone and all(len(r) == 5 for r in together)


def test_sampling_is_seeded_and_stops_at_the_end_token(model):
    prompts = [[7, 8, 9], [10, 11]]
    a = sample_ids(model, prompts, 3, 6, 1.0, torch.Generator().manual_seed(1), end_id=5)
    b = sample_ids(model, prompts, 3, 6, 1.0, torch.Generator().manual_seed(1), end_id=5)
    assert a == b and len(a) == 6
    some_token = a[0][0]
    cut = sample_ids(model, prompts, 3, 6, 1.0, torch.Generator().manual_seed(1), end_id=some_token)
    assert cut[0] == [some_token]


def test_response_mask_and_sequence_logprobs():
    mask = response_mask(torch.tensor([5, 3]), torch.tensor([3, 1]), 4)
    # position t predicts token t + 1: response tokens 3, 4 of the first row, 1, 2 of the second
    assert mask.tolist() == [[False, False, True, True], [True, True, False, False]]


def test_reward_model_reads_the_last_response_token_and_ignores_padding(model):
    reward = RewardModel(model)
    torch.nn.init.normal_(reward.head.weight, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[7, 8, 9, 5, 1, 1], [7, 8, 9, 5, 0, 0]])
    r = reward(ids, torch.tensor([4, 4]))
    assert torch.allclose(r[0], r[1])
    total, per_token = sequence_logprobs(model, ids, torch.tensor([4, 4]), torch.tensor([2, 2]))
    assert torch.allclose(total[0], total[1]) and (per_token[:, 3:] == 0).all()
