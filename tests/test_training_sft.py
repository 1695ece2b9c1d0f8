"""Tests for lmpipe.training.sft with its data pipeline (sft_data), lora and heads on a briefly pretrained toy
GPT: masking, padding, frozen weights, merging, heads, runs, resume."""

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from lmpipe.chat import CHAT_TEMPLATE, tokenizer_config
from lmpipe.data.instructions import EXAMPLE_COLUMNS, encode_example, encode_prompt, write_examples
from lmpipe.errors import LmpipeError
from lmpipe.model import GPT, GPTConfig, load_model, save_checkpoint
from lmpipe.tokenizer import PAD, TOKENIZER_CONFIG_FILE, TokenizerConfig, save_tokenizer, train_tokenizer
from lmpipe.training import core
from lmpipe.training.configs import OptimizerConfig, SFTConfig
from lmpipe.training.heads import HeadClassifier, prompt_features
from lmpipe.training.lora import LoRALinear, merge_lora
from lmpipe.training.sft import LitSFT, SFTDataModule, finetune
from lmpipe.training.sft_data import RandomExampleBatches, collate, encode_head_examples, encode_lm_examples
from lmpipe.training.streams import StreamSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BLOCK = 64
# Toy "verses": each book's words use their own letters, so both label tasks are separable from the text.
LETTERS = {"Genesis": "abcdef", "Exodus": "ghijklm", "Mark": "nopqrstu"}
TESTAMENT = {"Genesis": "Old", "Exodus": "Old", "Mark": "New"}
LABEL_SETS = {"testament": ["Old", "New"], "book": list(LETTERS)}
SPLIT_SIZES = {"train": 40, "val": 12, "test": 4}
PAD_ID = 1  # special tokens take ids 0..5 in a fixed order in every lmpipe tokenizer


def toy_verse(rng: np.random.Generator, book: str) -> str:
    letters = list(LETTERS[book])
    words = ["".join(rng.choice(letters, size=rng.integers(3, 6))) for _ in range(rng.integers(3, 5))]
    return " ".join(words)


def toy_examples(seed: int = 0) -> pd.DataFrame:
    """testament, book and continue examples of toy verses, plus one train example too long for BLOCK."""
    rng = np.random.default_rng(seed)
    records = []
    for split, n in SPLIT_SIZES.items():
        for i in range(n):
            book = list(LETTERS)[i % len(LETTERS)]
            verse = toy_verse(rng, book)
            doc = f"{book} {split} {i}"
            first, _, second = verse.partition(" ")
            testament = TESTAMENT[book]
            records += [
                (f"testament:{doc}", "testament", f"Testament? {verse}", testament, testament, split, doc),
                (f"book:{doc}", "book", f"Book? {verse}", book, book, split, doc),
                (f"continue:{doc}", "continue", f"Go on: {first}", second, None, split, doc),
            ]
    records.append(("continue:long", "continue", "Go on: " + "ab " * 40, "cd", None, "train", "long"))
    df = pd.DataFrame(records, columns=list(EXAMPLE_COLUMNS))
    df.attrs["instructions"] = {"label_sets": LABEL_SETS, "dropped_ambiguous": {}, "skipped_short": 0}
    return df


def make_inputs(root: Path) -> SimpleNamespace:
    """A briefly pretrained tiny GPT with its char tokenizer and chat template (as the pretrain stage writes
    them) and toy instruction examples (as the instructions stage writes them), under `root`."""
    examples = toy_examples()
    tok = train_tokenizer(
        list(examples["prompt"]) + list(examples["response"]), TokenizerConfig(kind="char", vocab_size=128)
    )
    models = root / "models"
    (models / "pretrain").mkdir(parents=True)
    save_tokenizer(tok, models / "pretrain" / "tokenizer.json")
    (models / "pretrain" / TOKENIZER_CONFIG_FILE).write_text(json.dumps(tokenizer_config()))

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tok.get_vocab_size(), block_size=BLOCK, n_layer=2, n_head=2, n_embd=32)
    model = GPT(config)  # dropout 0.1: resuming must restore the RNG
    text = torch.tensor(tok.encode(" ".join(examples["prompt"])).ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):  # just enough to make it a language model of the toy text
        starts = torch.randint(0, len(text) - BLOCK - 1, (8,), generator=gen)
        rows = torch.stack([text[s : s + BLOCK + 1] for s in starts])
        loss = model(rows[:, :-1], rows[:, 1:]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_checkpoint(models / "pretrain" / "model.pt", model, {"stage": "pretrain"})

    instructions = root / "instructions"
    write_examples(examples, instructions)
    return SimpleNamespace(models=models, instructions=instructions, tokenizer=tok, examples=examples)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """`make_inputs` once per module, on one torch thread (the function-scoped one_torch_thread comes later)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return make_inputs(tmp_path_factory.mktemp("sft_inputs"))
    finally:
        torch.set_num_threads(threads)


def pretrained(inputs) -> GPT:
    return load_model(inputs.models / "pretrain" / "model.pt")[0]


def split(inputs, name: str) -> pd.DataFrame:
    return inputs.examples[inputs.examples["split"] == name]


TEST_SFT = {
    "batch_size": 8,
    "max_steps": 20,
    "lr": 3e-3,
    "warmup_steps": 2,
    "val_check_interval": 5,
    "limit_val_batches": 2,
    "checkpoint_every_n_steps": 5,
    "num_samples": 2,
    "sample_tokens": 8,
}


@pytest.fixture
def sft_config(tiny_config, inputs, tmp_path):
    """`sft_config(root=..., **sft_fields)`: the smoke config plus the sft section and paths.instructions."""

    def make(root=tmp_path, **fields):
        cfg = tiny_config(root=root)
        OmegaConf.set_struct(cfg, False)
        cfg.paths.models = str(inputs.models)
        cfg.paths.instructions = str(inputs.instructions)
        cfg.trainer.log_every_n_steps = 1
        cfg.sft = {"_target_": "lmpipe.training.configs.SFTConfig", **TEST_SFT, **fields}
        return cfg

    return make


def module_for(inputs, method: str, **fields) -> LitSFT:
    sft = SFTConfig(method=method, **{**TEST_SFT, **fields})
    optimizer = OptimizerConfig(lr=sft.lr, weight_decay=0.1)
    sizes = {task: len(labels) for task, labels in LABEL_SETS.items()} if method == "head" else None
    return LitSFT(pretrained(inputs), optimizer, sft, 0, sizes)


def train_steps(module: LitSFT, rows, steps: int, batch_size: int = 8) -> None:
    """A plain optimisation loop over the module's own objective and optimizer."""
    optimizer = module.configure_optimizers()["optimizer"]
    batches = RandomExampleBatches(rows, batch_size, PAD_ID, StreamSpec(seed=0, batches_per_epoch=1))
    module.train()
    for step in range(steps):
        loss = module.batch_loss(batches.batch(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


# --- Config and data ---------------------------------------------------------------------------------------


def test_validation_batches_are_fixed_and_mix_the_tasks(inputs):
    rows, _ = encode_head_examples(split(inputs, "val"), inputs.tokenizer, CHAT_TEMPLATE, BLOCK, LABEL_SETS)
    rows.sort(key=lambda row: row["task"])  # task by task, as the instructions stage writes them

    def first_val_batch():
        module = SFTDataModule(rows, rows, batch_size=8, seed=3, pad_id=PAD_ID)
        return next(iter(module.val_dataloader()))

    first = first_val_batch()
    assert set(first["task"].tolist()) == {0, 1}
    assert all(torch.equal(first[k], v) for k, v in first_val_batch().items())


def test_the_loss_counts_response_tokens_only(inputs):
    tok, frame = inputs.tokenizer, split(inputs, "val").iloc[[0, 1, 2, 5]]
    rows, skipped = encode_lm_examples(frame, tok, CHAT_TEMPLATE, BLOCK)
    assert skipped == 0 and len({len(r["input_ids"]) for r in rows}) > 1  # unequal lengths: padding happens
    batch = collate(rows, tok.token_to_id(PAD))
    model = pretrained(inputs)
    loss = model(batch["input_ids"], batch["labels"]).loss

    # The same quantity from scratch: each example alone, cross-entropy of its response + <|end|> tokens given
    # everything before them, averaged over all those tokens of the batch.
    total, count = 0.0, 0
    for prompt, response in zip(frame["prompt"], frame["response"], strict=True):
        ids, _ = encode_example(tok, CHAT_TEMPLATE, prompt, response, BLOCK)
        start = len(encode_prompt(tok, CHAT_TEMPLATE, prompt))
        logits = model(torch.tensor([ids[:-1]])).logits[0]
        total += F.cross_entropy(logits[start - 1 :], torch.tensor(ids[start:]), reduction="sum").item()
        count += len(ids) - start
    assert loss.item() == pytest.approx(total / count, abs=1e-5)

    # What the padding holds changes nothing; a response token does.
    garbage = batch["input_ids"].clone()
    lengths = torch.tensor([len(r["input_ids"]) for r in rows])
    padding = torch.arange(garbage.shape[1])[None, :] >= lengths[:, None]
    assert padding.any() and (batch["labels"][padding] == -100).all()
    garbage[padding] = 7
    assert model(garbage, batch["labels"]).loss.item() == pytest.approx(loss.item(), abs=1e-6)
    changed = batch["labels"].clone()
    last = len(rows[0]["labels"]) - 1  # row 0's final target, <|end|>
    changed[0, last] = (changed[0, last] + 1) % tok.get_vocab_size()
    assert abs(model(batch["input_ids"], changed).loss.item() - loss.item()) > 1e-3


# --- LoRA and heads ----------------------------------------------------------------------------------------


def test_lora_trains_only_adapters_and_merges_into_the_same_function(inputs, tmp_path):
    before = {k: v.clone() for k, v in pretrained(inputs).state_dict().items()}
    module = module_for(inputs, "lora", lora_rank=4, lora_dropout=0.1)
    model = module.model
    adapters = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert len(adapters) == 4 * model.config.n_layer  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    initial = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    trainable, total = module.parameter_counts()
    assert trainable == sum(4 * (m.base.in_features + m.base.out_features) for m in adapters.values())
    assert total == trainable + pretrained(inputs).num_parameters()

    rows, _ = encode_lm_examples(split(inputs, "train"), inputs.tokenizer, CHAT_TEMPLATE, BLOCK)
    train_steps(module, rows, steps=5)

    state = model.state_dict()
    base = {k.replace(".base.", "."): v for k, v in state.items() if "lora_" not in k}
    assert base.keys() == before.keys()
    for name, weight in before.items():
        assert torch.equal(base[name], weight), name
    for name, weight in initial.items():
        assert not torch.equal(state[name], weight), name  # A and B both moved (B from zeros)

    model.eval()
    x = collate(rows[:4], PAD_ID)["input_ids"]
    merged = merge_lora(copy.deepcopy(model))
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert merged.state_dict().keys() == before.keys()
    assert not torch.equal(merged.blocks[0].attn.c_attn.weight, before["blocks.0.attn.c_attn.weight"])
    torch.testing.assert_close(merged(x).logits, model(x).logits, rtol=0, atol=1e-5)
    # The merged model is a plain GPT: it saves and loads as one.
    save_checkpoint(tmp_path / "merged.pt", merged, {})
    torch.testing.assert_close(
        load_model(tmp_path / "merged.pt")[0](x).logits, model(x).logits, rtol=0, atol=1e-5
    )


def test_head_freezes_the_gpt_and_learns_a_separable_task(inputs):
    before = {k: v.clone() for k, v in pretrained(inputs).state_dict().items()}
    module = module_for(inputs, "head", lr=1e-2)
    trainable, _ = module.parameter_counts()
    assert trainable == sum((32 + 1) * len(labels) for labels in LABEL_SETS.values())
    initial = {k: v.clone() for k, v in module.heads.state_dict().items()}
    rows, skipped = encode_head_examples(
        split(inputs, "train"), inputs.tokenizer, CHAT_TEMPLATE, BLOCK, LABEL_SETS
    )
    assert skipped == 0 and len(rows) == 2 * SPLIT_SIZES["train"]  # the continue examples are not used
    module.heads.set_feature_stats(prompt_features(module.model, rows, PAD_ID))
    train_steps(module, rows, steps=100, batch_size=16)
    assert not module.model.training  # frozen features: no dropout even in training mode

    for name, weight in module.model.state_dict().items():
        assert torch.equal(weight, before[name]), name
    assert all(not torch.equal(module.heads.state_dict()[k], v) for k, v in initial.items())

    classifier = HeadClassifier(module.model, module.heads, inputs.tokenizer, CHAT_TEMPLATE, LABEL_SETS)
    val = split(inputs, "val")
    for task, labels in LABEL_SETS.items():
        part = val[val["task"] == task]
        proba = classifier.predict_proba(task, part["prompt"].tolist())
        assert proba.shape == (len(part), len(labels))
        np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
        accuracy = np.mean(np.asarray(classifier.predict(task, part["prompt"].tolist())) == part["label"])
        assert accuracy >= 0.9, (task, accuracy)
    with pytest.raises(LmpipeError, match="^task 'continue': no classification head"):
        classifier.predict_proba("continue", ["x"])


# --- Runs --------------------------------------------------------------------------------------------------


def response_loss(model: GPT, inputs) -> float:
    rows, _ = encode_lm_examples(split(inputs, "val"), inputs.tokenizer, CHAT_TEMPLATE, BLOCK)
    batch = collate(rows, inputs.tokenizer.token_to_id(PAD))
    with torch.no_grad():
        return model.eval()(batch["input_ids"], batch["labels"]).loss.item()


def test_full_finetuning_changes_the_weights_and_lowers_the_response_loss(sft_config, inputs, tmp_path):
    result = finetune(sft_config(method="full", max_steps=30, val_check_interval=10))

    m = result.metrics
    assert result.method == m["method"] == "full" and result.heads is None
    assert m["steps"] == 30 and m["resumed"] is False
    assert m["trainable_parameters"] == m["total_parameters"] == result.model.num_parameters()
    assert m["skipped_too_long"] == {"train": 1, "val": 0}
    assert m["train_examples"] == 3 * SPLIT_SIZES["train"] and m["val_examples"] == 3 * SPLIT_SIZES["val"]
    assert [step for step, _ in result.curves["val_loss"]] == [10, 20, 30]
    assert [step for step, _ in result.curves["train_loss"]] == list(range(1, 31))
    assert m["val_loss"] == result.curves["val_loss"][-1][1] < result.curves["val_loss"][0][1]
    assert m["fit"]["verdict"] in {"overfitting", "underfitting", "converged"}

    start = pretrained(inputs)
    assert not torch.equal(result.model.wte.weight, start.wte.weight)
    assert response_loss(result.model, inputs) < response_loss(start, inputs) - 0.5
    assert len(result.samples) == 2 and {s["reference"] for s in result.samples} <= set(
        inputs.examples["response"]
    )
    assert all(isinstance(s["completion"], str) for s in result.samples)
    ckpt = torch.load(tmp_path / "checkpoints" / "sft" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 30


def test_head_run_keeps_the_pretrained_model_and_reports_accuracy(sft_config, inputs):
    result = finetune(sft_config(method="head", max_steps=10, val_check_interval=5, lr=1e-2))
    assert result.method == "head" and set(result.metrics["val_accuracy"]) == set(LABEL_SETS)
    for name, weight in pretrained(inputs).state_dict().items():
        assert torch.equal(result.model.state_dict()[name], weight), name
    assert {k: tuple(v.shape) for k, v in result.heads.items()} == {
        "feature_mean": (32,),
        "feature_std": (32,),
        "testament.weight": (2, 32),
        "testament.bias": (2,),
        "book.weight": (3, 32),
        "book.bias": (3,),
    }
    m = result.metrics
    assert (
        m["trainable_parameters"] == (32 + 1) * 5 and m["total_parameters"] > 100 * m["trainable_parameters"]
    )
    assert m["train_examples"] == 2 * SPLIT_SIZES["train"]
    assert [s["reference"] for s in result.samples][0] in {"Old", "New"}


def test_a_head_task_without_labels_is_a_one_line_error(sft_config):
    with pytest.raises(
        LmpipeError, match=r"^sft\.head_tasks: task 'continue' has no label set in .*labels\.json"
    ):
        finetune(sft_config(method="head", head_tasks=["continue"]))


class Killed(Exception):
    """Stands in for the process dying."""


class KillAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Killed(f"killed at step {self.step}")


class StepLog(L.Callback):
    """The global step at the start of every training batch, and whether the GPT was in training mode."""

    def __init__(self):
        self.steps: list[int] = []
        self.training: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append(trainer.global_step)
        self.training.append(pl_module.model.training)


def test_an_interrupted_lora_run_resumes_to_identical_weights(sft_config, tmp_path, monkeypatch):
    def run_with(*callbacks, root):
        monkeypatch.setattr(core, "progress_callbacks", lambda every: (list(callbacks), False))
        return finetune(sft_config(root=root, method="lora", max_steps=12, lora_dropout=0.1))

    full = run_with(root=tmp_path / "full")
    with pytest.raises(Killed):
        run_with(KillAt(7), root=tmp_path / "killed")
    ckpt_dir = tmp_path / "killed" / "checkpoints" / "sft"
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=False)["global_step"] == 5

    steps = StepLog()
    resumed = run_with(steps, root=tmp_path / "killed")
    assert resumed.metrics["resumed"] is True and steps.steps == list(range(5, 12))
    assert all(
        steps.training
    )  # dropout on (load_model hands the GPT over in eval mode), also after validation
    full_weights, resumed_weights = full.model.state_dict(), resumed.model.state_dict()
    assert full_weights.keys() == resumed_weights.keys()
    for name, weight in full_weights.items():
        assert torch.equal(resumed_weights[name], weight), name
    assert resumed.curves["train_loss"] == full.curves["train_loss"]
    # Step 5's validation ran after that step's checkpoint, and Lightning does not repeat it on resume.
    assert resumed.curves["val_loss"] == [p for p in full.curves["val_loss"] if p[0] != 5]
    assert resumed.samples == full.samples


# --- Replay: pretraining windows mixed into SFT batches ------------------------------------------------------


def test_replay_config_splits_the_batch_and_head_ignores_it():
    assert SFTConfig(batch_size=32, replay=0.25).replay_split == (24, 8)
    assert SFTConfig(batch_size=32).replay_split == (32, 0)
    # the default run's replay share must not stop `make compare-sft`'s head method (a frozen GPT)
    assert SFTConfig(method="head", batch_size=32, replay=0.25).replay_split == (32, 0)
    with pytest.raises(LmpipeError, match=r"sft.replay=0.01: .* 0 windows and 8 examples"):
        SFTConfig(batch_size=8, replay=0.01)


def test_replay_mixes_windows_into_batches_and_weights_the_losses_by_rows(sft_config, inputs, tmp_path):
    from lmpipe.tokenizer import write_shards

    text = " ".join(inputs.examples["prompt"])
    write_shards(tmp_path / "tokens", {"train": [text], "val": [text]}, inputs.tokenizer, show_progress=False)
    cfg = sft_config(replay=0.25, max_steps=4, val_check_interval=2)
    cfg.paths.tokens = str(tmp_path / "tokens")
    result = finetune(cfg)
    assert result.metrics["steps"] == 4

    module = module_for(inputs, "full").eval()  # no dropout: the two sides must see the same weights
    rows, _ = encode_lm_examples(split(inputs, "train"), inputs.tokenizer, CHAT_TEMPLATE, BLOCK)
    examples = collate(rows[:6], PAD_ID)
    windows = (examples["input_ids"][:2, :8], examples["input_ids"][:2, 1:9])
    mixed = module.batch_loss({"sft": examples, "lm": windows})
    expected = 0.75 * module.batch_loss(examples) + 0.25 * module.model(*windows).loss
    assert torch.allclose(mixed, expected)
