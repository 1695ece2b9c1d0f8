"""Inputs for the post-training tests (reward, DPO, RL): a tiny "SFT" model directory and preference pairs.

Not a test module. The pairs are a toy preference that a tiny model learns in a few steps: for every prompt the
chosen response is "yes" and the rejected one "no" (kind `random`), or a longer wrong word (kind `on_policy`).
"""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from lmpipe.chat import tokenizer_config
from lmpipe.data.preferences import pair_stats, write_pairs
from lmpipe.errors import LmpipeError
from lmpipe.formats import TOKENIZER_CONFIG_FILE
from lmpipe.model import GPT, GPTConfig, save_checkpoint
from lmpipe.tokenizer import TokenizerConfig, save_tokenizer, train_tokenizer

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]


def toy_pairs() -> dict[str, list[dict]]:
    pairs = {"train": [], "val": [], "test": []}
    for i in range(48):
        split = "train" if i < 32 else "val" if i < 40 else "test"
        word = WORDS[i % len(WORDS)]
        kind = "random" if i % 2 else "on_policy"
        pairs[split].append(
            {
                "id": f"p{i}",
                "task": "testament" if i % 3 else "book",
                "prompt": f"Is {word} {i}?",
                "chosen": "yes",
                "rejected": "no" if kind == "random" else "nope",
                "kind": kind,
                "doc_id": f"d{i}",
            }
        )
    return pairs


def make_inputs(root: Path) -> SimpleNamespace:
    pairs = toy_pairs()
    texts = [p["prompt"] + p["chosen"] + p["rejected"] for part in pairs.values() for p in part]
    tok = train_tokenizer(texts, TokenizerConfig(kind="char", vocab_size=128))
    sft = root / "models" / "sft"
    sft.mkdir(parents=True)
    save_tokenizer(tok, sft / "tokenizer.json")
    (sft / TOKENIZER_CONFIG_FILE).write_text(json.dumps(tokenizer_config()))
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(vocab_size=tok.get_vocab_size(), block_size=32, n_layer=1, n_head=2, n_embd=32, dropout=0.0)
    )
    save_checkpoint(sft / "model.pt", model, {"stage": "sft", "method": "full"})
    preferences = root / "preferences"
    write_pairs(pairs, pair_stats(pairs, {}), preferences)
    return SimpleNamespace(models=root / "models", preferences=preferences, tokenizer=tok, pairs=pairs)


def post_config(tiny_config, inputs, root: Path, section: str, target: str, **fields):
    """The smoke config with paths.models/preferences at `inputs`, outputs under `root`, and `section`."""
    cfg = tiny_config(root=root)
    OmegaConf.set_struct(cfg, False)
    cfg.paths.models = str(inputs.models)
    cfg.paths.preferences = str(inputs.preferences)
    cfg.trainer.log_every_n_steps = 1
    cfg[section] = {"_target_": target, **fields}
    return cfg


def refuses_a_reference_with_another_tokenizer(train, cfg, inputs, root: Path, section: str) -> None:
    """`train(cfg)` with `<section>.reference=other`, a copy of the SFT model beside a tokenizer with another
    special token, stops with the one-line error naming the field, before any checkpoint is written."""
    models = root / "models"
    shutil.copytree(inputs.models, models)
    shutil.copytree(models / "sft", models / "other")
    tok = json.loads((models / "other" / "tokenizer.json").read_text())
    tok["added_tokens"][0]["content"] = "<|other|>"
    (models / "other" / "tokenizer.json").write_text(json.dumps(tok))
    cfg.paths.models = str(models)
    cfg[section].reference = "other"
    message = rf"^{section}.reference='other': its tokenizer .* differs from the policy's"
    with pytest.raises(LmpipeError, match=message):
        train(cfg)
    assert not (root / "checkpoints").exists()
