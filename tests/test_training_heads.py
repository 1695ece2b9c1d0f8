"""Tests for lmpipe.training.heads on disk: save_heads / load_head_classifier round trips, one-line errors, and
an import that stays free of Lightning (the classifier is used at evaluation time)."""

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from lmpipe.chat import CHAT_TEMPLATE, tokenizer_config
from lmpipe.data.instructions import encode_prompt
from lmpipe.errors import LmpipeError
from lmpipe.model import GPT, GPTConfig, save_checkpoint
from lmpipe.tokenizer import (
    PAD,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    TokenizerConfig,
    save_tokenizer,
    train_tokenizer,
)
from lmpipe.training.heads import (
    HEADS_FILE,
    ClassificationHeads,
    HeadClassifier,
    load_head_classifier,
    prompt_features,
    save_heads,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_EMBD = 16
LABEL_SETS = {"testament": ["Old", "New"], "book": ["Genesis", "Exodus", "Mark"]}
PROMPTS = ["abc fed cab", "ghi jkl mgh", "nop qrs tun", "bad cafe", "stop run", "hijk ml"]


@pytest.fixture
def saved(tmp_path) -> SimpleNamespace:
    """A tiny GPT with heads that give distinct, confident answers, written as the sft stage writes a
    method=head model directory; and the classifier it was written from."""
    tok = train_tokenizer(PROMPTS, TokenizerConfig(kind="char", vocab_size=64))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.get_vocab_size(), block_size=32, n_layer=1, n_head=2, n_embd=N_EMBD))
    model.eval()
    heads = ClassificationHeads(N_EMBD, {task: len(labels) for task, labels in LABEL_SETS.items()}, seed=1)
    generator = torch.Generator().manual_seed(2)
    for head in heads.values():  # far from the initial 0.02 scale, so a load that ignored them would show
        nn.init.normal_(head.weight, std=1.0, generator=generator)
        nn.init.normal_(head.bias, std=1.0, generator=generator)
    rows = []
    for prompt in PROMPTS:
        ids = encode_prompt(tok, CHAT_TEMPLATE, prompt)
        rows.append({"input_ids": np.asarray(ids, dtype=np.int64), "last": len(ids) - 1})
    heads.set_feature_stats(prompt_features(model, rows, tok.token_to_id(PAD)))
    classifier = HeadClassifier(model, heads, tok, CHAT_TEMPLATE, LABEL_SETS)

    model_dir = tmp_path / "sft"
    model_dir.mkdir()
    save_checkpoint(model_dir / "model.pt", model, {"stage": "sft", "method": "head"})
    save_tokenizer(tok, model_dir / TOKENIZER_FILE)
    (model_dir / TOKENIZER_CONFIG_FILE).write_text(json.dumps(tokenizer_config()))
    save_heads(model_dir / HEADS_FILE, heads.state_dict(), LABEL_SETS, N_EMBD)
    return SimpleNamespace(model_dir=model_dir, classifier=classifier, heads=heads)


def test_a_saved_head_classifier_loads_with_the_same_predictions(saved):
    assert sorted(p.name for p in saved.model_dir.iterdir()) == sorted(
        ["model.pt", HEADS_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE]
    )  # written atomically: no temporary left beside heads.pt
    loaded = load_head_classifier(saved.model_dir)

    assert loaded.label_sets == LABEL_SETS and list(loaded.heads) == list(LABEL_SETS)
    assert not loaded.model.training and not loaded.heads.training
    for name, value in saved.heads.state_dict().items():
        assert torch.equal(loaded.heads.state_dict()[name], value), name
    for task in LABEL_SETS:
        before = saved.classifier.predict_proba(task, PROMPTS)
        assert len({tuple(row) for row in before.round(4)}) > 1  # the prompts get different answers
        np.testing.assert_array_equal(loaded.predict_proba(task, PROMPTS), before)
        assert loaded.predict(task, PROMPTS) == saved.classifier.predict(task, PROMPTS)


@pytest.mark.parametrize("name", ["model.pt", HEADS_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE])
def test_a_missing_file_is_a_one_line_error_naming_it(saved, name):
    (saved.model_dir / name).unlink()
    with pytest.raises(LmpipeError, match=rf"^missing {saved.model_dir / name}: expected a model directory"):
        load_head_classifier(saved.model_dir)


def test_heads_that_do_not_fit_the_model_are_a_one_line_error(saved):
    wider = ClassificationHeads(N_EMBD * 2, {"testament": 2})
    save_heads(saved.model_dir / HEADS_FILE, wider.state_dict(), {"testament": ["Old", "New"]}, N_EMBD * 2)
    with pytest.raises(LmpipeError, match=r"heads\.pt: the heads read 32 features but .* has n_embd 16"):
        load_head_classifier(saved.model_dir)

    # A label set that does not match the head's outputs is refused rather than loaded half-way.
    save_heads(
        saved.model_dir / HEADS_FILE, saved.heads.state_dict(), {**LABEL_SETS, "book": ["Mark"]}, N_EMBD
    )
    with pytest.raises(LmpipeError, match=r"heads\.pt: not a lmpipe classification heads file \(.*book"):
        load_head_classifier(saved.model_dir)

    (saved.model_dir / HEADS_FILE).write_bytes(b"not a torch file")
    with pytest.raises(LmpipeError, match=r"heads\.pt: not a readable torch file"):
        load_head_classifier(saved.model_dir)


def test_importing_the_heads_does_not_import_lightning():
    code = "import sys, lmpipe.training.heads; print(sorted(m for m in sys.modules if 'lightning' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
