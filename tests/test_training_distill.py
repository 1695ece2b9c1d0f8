"""Tests for lmpipe.training.distill on a briefly pretrained toy teacher: the loss by hand, the frozen
teacher, the teacher-less ablation, mixed batches, runs and resume."""

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from lmpipe.chat import CHAT_TEMPLATE
from lmpipe.data.instructions import EXAMPLE_COLUMNS, write_examples
from lmpipe.errors import LmpipeError
from lmpipe.model import GPT, GPTConfig, load_model, save_checkpoint
from lmpipe.tokenizer import (
    TokenizerConfig,
    copy_tokenizer,
    read_shard,
    save_tokenizer,
    train_tokenizer,
    write_shards,
)
from lmpipe.training import core
from lmpipe.training import distill as distill_module
from lmpipe.training.configs import DistillConfig, OptimizerConfig
from lmpipe.training.datamodules import ContiguousWindows, RandomWindows
from lmpipe.training.distill import (
    LitDistill,
    MixedBatches,
    MixedValidation,
    build_student,
    distill,
    distillation_loss,
)
from lmpipe.training.sft_data import RandomExampleBatches, encode_lm_examples
from lmpipe.training.streams import StreamSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEACHER_BLOCK = 64
STUDENT = {
    "n_layer": 1,
    "n_head": 2,
    "n_embd": 16,
    "block_size": 32,
    "pos_encoding": "rotary",
    "dropout": 0.0,
}
# Toy "verses": each book's words use their own letters, so the answers follow from the text.
LETTERS = {"Genesis": "abcdef", "Exodus": "ghijklm", "Mark": "nopqrstu"}
TESTAMENT = {"Genesis": "Old", "Exodus": "Old", "Mark": "New"}
SPLIT_SIZES = {"train": 40, "val": 12, "test": 4}
PAD_ID = 1  # special tokens take ids 0..5 in a fixed order in every lmpipe tokenizer


def toy_verse(rng: np.random.Generator, book: str) -> str:
    letters = list(LETTERS[book])
    return " ".join("".join(rng.choice(letters, size=rng.integers(2, 4))) for _ in range(rng.integers(2, 4)))


def toy_data(seed: int = 0) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """Short testament/book/continue examples (they fit the student's 32 tokens, but for one long train
    example) and a corpus of toy verses per split."""
    rng = np.random.default_rng(seed)
    records, corpus = [], {}
    for split, n in SPLIT_SIZES.items():
        for i in range(n):
            book = list(LETTERS)[i % len(LETTERS)]
            verse = toy_verse(rng, book)
            doc = f"{book} {split} {i}"
            first, _, second = verse.partition(" ")
            records += [
                (f"t:{doc}", "testament", f"T? {verse}", TESTAMENT[book], TESTAMENT[book], split, doc),
                (f"b:{doc}", "book", f"B? {verse}", book, book, split, doc),
                (f"c:{doc}", "continue", f"C: {first}", second, None, split, doc),
            ]
        corpus[split] = [toy_verse(rng, list(LETTERS)[i % 3]) for i in range(n * 6)]
    records.append(("c:long", "continue", "C: " + "ab " * 20, "cd", None, "train", "long"))
    df = pd.DataFrame(records, columns=list(EXAMPLE_COLUMNS))
    df.attrs["instructions"] = {
        "label_sets": {"testament": ["Old", "New"], "book": list(LETTERS)},
        "dropped_ambiguous": {},
        "skipped_short": 0,
    }
    return df, corpus


def make_inputs(root: Path) -> SimpleNamespace:
    """Token shards with their char tokenizer (as the tokenize stage writes them), a briefly pretrained tiny
    teacher in `<models>/sft` (tokenizer files copied beside it) and the instruction examples."""
    examples, corpus = toy_data()
    texts = [*corpus["train"], *examples["prompt"], *examples["response"]]
    tok = train_tokenizer(texts, TokenizerConfig(kind="char", vocab_size=128))
    tokens = root / "tokens"
    write_shards(tokens, corpus, tok, show_progress=False)

    torch.manual_seed(0)
    teacher_cfg = GPTConfig(
        vocab_size=tok.get_vocab_size(), block_size=TEACHER_BLOCK, n_layer=2, n_head=2, n_embd=32
    )
    teacher = GPT(teacher_cfg)
    windows = RandomWindows(tokens, "train", TEACHER_BLOCK, 8, StreamSpec(seed=0, batches_per_epoch=1))
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    for step in range(30):  # just enough to make it a language model of the toy text
        loss = teacher(*windows.batch(step)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    models = root / "models"
    (models / "sft").mkdir(parents=True)
    save_checkpoint(models / "sft" / "model.pt", teacher, {"stage": "sft"})
    copy_tokenizer(tokens, models / "sft")

    instructions = root / "instructions"
    write_examples(examples, instructions)
    return SimpleNamespace(
        tokens=tokens, models=models, instructions=instructions, tokenizer=tok, examples=examples
    )


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """`make_inputs` once per module, on one torch thread (the function-scoped one_torch_thread is later)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return make_inputs(tmp_path_factory.mktemp("distill_inputs"))
    finally:
        torch.set_num_threads(threads)


def teacher_of(inputs) -> GPT:
    return load_model(inputs.models / "sft" / "model.pt")[0]


TEST_DISTILL = {
    "student": STUDENT,
    "batch_size": 8,
    "max_steps": 20,
    "lr": 1e-2,
    "warmup_steps": 2,
    "val_check_interval": 5,
    "limit_val_batches": 2,
    "checkpoint_every_n_steps": 5,
    "num_samples": 2,
    "sample_tokens": 8,
}


@pytest.fixture
def distill_config(tiny_config, inputs, tmp_path):
    """`distill_config(root=..., **distill_fields)`: the smoke config, the toy inputs, a distill section."""

    def make(root=tmp_path, **fields):
        cfg = tiny_config(root=root)
        OmegaConf.set_struct(cfg, False)
        cfg.paths.tokens = str(inputs.tokens)
        cfg.paths.models = str(inputs.models)
        cfg.paths.instructions = str(inputs.instructions)
        cfg.trainer.log_every_n_steps = 1
        cfg.distill = {"_target_": "lmpipe.training.configs.DistillConfig", **TEST_DISTILL, **fields}
        return cfg

    return make


def example_rows(inputs, split: str):
    frame = inputs.examples[inputs.examples["split"] == split]
    return encode_lm_examples(frame, inputs.tokenizer, CHAT_TEMPLATE, STUDENT["block_size"])[0]


def val_batches(inputs, n_lm: int = 4, n_sft: int = 4) -> MixedValidation:
    windows = ContiguousWindows(read_shard(inputs.tokens, "val"), STUDENT["block_size"])
    return MixedValidation(windows, example_rows(inputs, "val"), n_lm, n_sft, PAD_ID)


def module_for(student: GPT, teacher: GPT | None, **fields) -> LitDistill:
    dcfg = DistillConfig(**{**TEST_DISTILL, "teacher": "sft" if teacher else "none", **fields})
    optimizer = OptimizerConfig(lr=dcfg.lr, weight_decay=dcfg.weight_decay)
    return LitDistill(student, teacher, optimizer, dcfg)


def student_for(inputs, seed: int = 0) -> GPT:
    return build_student(
        DistillConfig(student=STUDENT).student_config(inputs.tokenizer.get_vocab_size()), seed
    )


# --- Config -------------------------------------------------------------------------------------------------


# --- The loss -----------------------------------------------------------------------------------------------


def test_the_loss_matches_a_hand_computation():
    student = [[1.0, 0.0, -1.0], [0.5, 0.5, 2.0], [3.0, -2.0, 0.0]]
    teacher = [[2.0, 1.0, 0.0], [0.0, 1.0, -1.0], [-4.0, 4.0, 0.0]]
    labels = [0, -100, 1]  # the middle position has no label: it counts in neither term
    T, alpha = 2.0, 0.3

    def softmax(row, t=1.0):
        z = [math.exp(v / t) for v in row]
        return [v / sum(z) for v in z]

    ce = [-math.log(softmax(student[i])[labels[i]]) for i in (0, 2)]
    kl = []
    for i in (0, 2):
        p, q = softmax(teacher[i], T), softmax(student[i], T)
        kl.append(sum(pv * math.log(pv / qv) for pv, qv in zip(p, q, strict=True)))
    want_ce, want_kl = sum(ce) / 2, sum(kl) / 2

    loss = distillation_loss(
        torch.tensor([student]), torch.tensor([labels]), torch.tensor([teacher]), T, alpha
    )
    assert loss.ce.item() == pytest.approx(want_ce, rel=1e-6)
    assert loss.kl.item() == pytest.approx(want_kl, rel=1e-6)
    assert loss.total.item() == pytest.approx(alpha * T**2 * want_kl + (1 - alpha) * want_ce, rel=1e-6)
    # Without a teacher the loss is the cross-entropy alone.
    alone = distillation_loss(torch.tensor([student]), torch.tensor([labels]))
    assert alone.kl is None and alone.total.item() == pytest.approx(want_ce, rel=1e-6)


def test_a_copy_of_the_student_as_teacher_gives_zero_kl_and_no_gradient(inputs):
    student = student_for(inputs)
    module = module_for(student, copy.deepcopy(student), alpha=1.0)
    loss = module.batch_loss(val_batches(inputs)[0])
    assert loss.kl.item() == pytest.approx(0.0, abs=1e-6) and loss.total.item() == pytest.approx(
        0.0, abs=1e-5
    )
    assert loss.ce.item() > 1.0  # the hard labels are far from learned: alpha=1 ignores them
    loss.total.backward()
    assert max(p.grad.abs().max().item() for p in student.parameters()) < 1e-6
    assert all(p.grad is None for p in module.teacher.parameters())


def test_without_a_teacher_the_objective_is_the_row_weighted_cross_entropy(inputs):
    student = student_for(inputs)
    module = module_for(student, None, alpha=0.9, sft_fraction=0.25)
    assert module.cfg.alpha == 0.0
    batch = val_batches(inputs, n_lm=6, n_sft=2)[0]
    loss = module.batch_loss(batch)
    lm, sft = (student(batch[p]["input_ids"], batch[p]["labels"]).loss for p in ("lm", "sft"))
    assert loss.kl is None and loss.total is loss.ce
    assert loss.ce.item() == pytest.approx(0.75 * lm.item() + 0.25 * sft.item(), rel=1e-6)


def test_the_student_depends_on_the_seed_alone(inputs):
    first = student_for(inputs, seed=3)
    GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=1, n_embd=8))  # draws from the global RNG
    again, other = student_for(inputs, seed=3), student_for(inputs, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), again.parameters(), strict=True))
    assert not torch.equal(first.wte.weight, other.wte.weight)


# --- Data ---------------------------------------------------------------------------------------------------


def test_mixed_batches_are_a_pure_function_of_seed_index_and_rank(inputs):
    rows = example_rows(inputs, "train")

    def batches(seed=0, rank=0, start=0, n_lm=5, n_sft=3):
        spec = StreamSpec(seed, batches_per_epoch=4, start_batch=start, rank=rank)
        windows = RandomWindows(inputs.tokens, "train", 32, n_lm, spec) if n_lm else None
        examples = RandomExampleBatches(rows, n_sft, PAD_ID, spec._replace(seed=seed + 1)) if n_sft else None
        return MixedBatches(windows, examples, spec)

    first = batches().batch(2)
    assert first["lm"]["input_ids"].shape == (5, 32) and len(first["sft"]["input_ids"]) == 3
    assert torch.equal(first["lm"]["labels"][:, :-1], first["lm"]["input_ids"][:, 1:])
    again = batches().batch(2)  # a fresh dataset, as on resume
    assert all(torch.equal(first[p][k], again[p][k]) for p in first for k in first[p])
    for other in (batches().batch(3), batches(rank=1).batch(2), batches(seed=1).batch(2)):
        assert not torch.equal(first["lm"]["input_ids"], other["lm"]["input_ids"])
    resumed = list(batches(start=2))
    assert len(resumed) == 2 and torch.equal(resumed[0]["sft"]["labels"], first["sft"]["labels"])
    assert set(batches(n_sft=0).batch(0)) == {"lm"} and set(batches(n_lm=0).batch(0)) == {"sft"}


def test_validation_batches_hold_the_training_mix_in_full_batches(inputs):
    val = val_batches(inputs, n_lm=4, n_sft=5)
    n_windows = (len(read_shard(inputs.tokens, "val")) - 1) // 32
    assert len(val) == min(n_windows // 4, len(example_rows(inputs, "val")) // 5) > 1
    batch = val[1]
    assert batch["lm"]["input_ids"].shape == (4, 32) and len(batch["sft"]["input_ids"]) == 5
    assert (batch["sft"]["labels"] != -100).any(dim=1).all()  # every example has response labels


# --- Runs ---------------------------------------------------------------------------------------------------


class Killed(Exception):
    """Stands in for the process dying."""


class KillAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Killed(f"killed at step {self.step}")


class StepLog(L.Callback):
    """The global step at the start of every training batch, and the student's and teacher's modes."""

    def __init__(self):
        self.steps: list[int] = []
        self.modes: list[tuple[bool, bool | None]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append(trainer.global_step)
        teacher = pl_module.teacher
        self.modes.append((pl_module.student.training, None if teacher is None else teacher.training))


@pytest.fixture
def run_with(distill_config, monkeypatch):
    """`run_with(*callbacks, root=..., **distill_fields)`: distill() with extra callbacks (in place of the
    progress lines)."""

    def run(*callbacks, root, **fields):
        monkeypatch.setattr(core, "progress_callbacks", lambda every: (list(callbacks), False))
        return distill(distill_config(root=root, **fields))

    return run


def val_kl(student: GPT, teacher: GPT, inputs) -> float:
    """Mean KL(teacher_T || student_T) over the first validation batches, weighted as in training."""
    module = module_for(student, teacher).eval()
    with torch.no_grad():
        return float(np.mean([module.batch_loss(val_batches(inputs)[i]).kl.item() for i in range(3)]))


def test_distillation_moves_the_student_towards_a_frozen_teacher(
    run_with, tiny_config, inputs, tmp_path, monkeypatch
):
    loaded = []

    def load_and_keep(path):
        model, extra = load_model(path)
        loaded.append(model)
        return model, extra

    monkeypatch.setattr(distill_module, "load_model", load_and_keep)
    steps = StepLog()
    result = run_with(steps, root=tmp_path, max_steps=30, val_check_interval=10, alpha=0.8)

    assert result.model.config.block_size == 32 and not result.model.training
    (teacher,) = loaded
    for name, weight in teacher_of(inputs).state_dict().items():
        assert torch.equal(teacher.state_dict()[name], weight), name
    assert not any(p.requires_grad for p in teacher.parameters())
    assert steps.modes == [(True, False)] * 30  # the teacher never left eval mode, also after validation

    start = student_for(inputs, seed=tiny_config().seed)  # the student's weights before training
    before, after = val_kl(start, teacher, inputs), val_kl(result.model, teacher, inputs)
    assert after < 0.5 * before, (before, after)
    kl = [v for _, v in result.curves["val_kl"]]
    assert [s for s, _ in result.curves["val_kl"]] == [10, 20, 30] and kl[-1] < kl[0]
    assert (
        result.metrics["val_kl"] == kl[-1] and result.metrics["val_loss"] == result.curves["val_loss"][-1][1]
    )

    m = result.metrics
    assert m["teacher"] == "sft" and m["steps"] == 30 and m["resumed"] is False
    assert (m["batch_windows"], m["batch_examples"]) == (4, 4)
    assert m["skipped_too_long"] == {"train": 1, "val": 0}
    assert m["train_examples"] == 3 * SPLIT_SIZES["train"] and m["val_examples"] == 3 * SPLIT_SIZES["val"]
    assert m["student_parameters"] == result.model.num_parameters() < m["teacher_parameters"]
    assert m["teacher_parameters"] == teacher.num_parameters()
    assert m["parameter_ratio"] == m["student_parameters"] / m["teacher_parameters"]
    assert set(result.curves) == {
        "train_loss", "val_loss", "val_lm_loss", "val_sft_loss", "val_kl", "val_lm_kl", "val_sft_kl",
    }  # fmt: skip
    assert [s for s, _ in result.curves["train_loss"]] == list(range(1, 31))
    assert m["fit"]["final_val_loss"] == m["val_loss"]
    assert len(result.samples) == 2 and all(isinstance(s["completion"], str) for s in result.samples)

    ckpt = torch.load(tmp_path / "checkpoints" / "distill-sft" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 30 and all(k.startswith("student.") for k in ckpt["state_dict"])


def test_without_a_teacher_nothing_is_loaded_and_only_hard_labels_train(run_with, tmp_path, monkeypatch):
    def refuse(path):
        raise AssertionError(f"loaded {path}")

    monkeypatch.setattr(distill_module, "load_model", refuse)
    steps = StepLog()
    result = run_with(steps, root=tmp_path, teacher="none", max_steps=10, alpha=0.9)
    m = result.metrics
    assert m["teacher"] == "none" and m["teacher_parameters"] is None and m["parameter_ratio"] is None
    assert set(result.curves) == {"train_loss", "val_loss", "val_lm_loss", "val_sft_loss"}
    assert steps.modes == [(True, None)] * 10
    assert result.curves["val_loss"][-1][1] < result.curves["val_loss"][0][1]
    assert (tmp_path / "checkpoints" / "distill-none" / "last.ckpt").is_file()


def test_a_student_context_beyond_the_teachers_is_a_one_line_error(distill_config):
    with pytest.raises(
        LmpipeError, match=r"^distill\.student\.block_size=128: exceeds the teacher's block_size 64;"
    ):
        distill(distill_config(student={**STUDENT, "block_size": 128}))


def test_a_teacher_must_exist_and_read_the_same_tokens(distill_config, inputs, tmp_path):
    with pytest.raises(LmpipeError, match=r"^missing model checkpoint .*/absent/model\.pt$"):
        distill(distill_config(teacher="absent"))
    other = tmp_path / "models" / "other"
    other.mkdir(parents=True)
    (other / "model.pt").write_bytes((inputs.models / "sft" / "model.pt").read_bytes())
    copy_tokenizer(inputs.tokens, other)
    save_tokenizer(
        train_tokenizer(["xyz"], TokenizerConfig(kind="char", vocab_size=128)), other / "tokenizer.json"
    )
    cfg = distill_config(teacher="other")
    cfg.paths.models = str(tmp_path / "models")
    with pytest.raises(
        LmpipeError, match=r"^.*/other/tokenizer\.json: not the tokenizer of .*/tokens; the teacher"
    ):
        distill(cfg)


def test_an_interrupted_run_resumes_to_identical_weights(run_with, tmp_path):
    fields = {"max_steps": 12, "student": {**STUDENT, "dropout": 0.1}}  # resuming must restore the RNG
    full = run_with(root=tmp_path / "full", **fields)
    with pytest.raises(Killed):
        run_with(KillAt(7), root=tmp_path / "killed", **fields)
    ckpt_dir = tmp_path / "killed" / "checkpoints" / "distill-sft"
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=False)["global_step"] == 5

    steps = StepLog()
    resumed = run_with(steps, root=tmp_path / "killed", **fields)
    assert resumed.metrics["resumed"] is True and steps.steps == list(range(5, 12))
    assert all(student and not teacher for student, teacher in steps.modes)
    full_weights, resumed_weights = full.model.state_dict(), resumed.model.state_dict()
    assert full_weights.keys() == resumed_weights.keys()
    for name, weight in full_weights.items():
        assert torch.equal(resumed_weights[name], weight), name
    assert resumed.curves["train_loss"] == full.curves["train_loss"]
    # Step 5's validation ran after that step's checkpoint, and Lightning does not repeat it on resume.
    for key, curve in full.curves.items():
        if key != "train_loss":
            assert resumed.curves[key] == [p for p in curve if p[0] != 5], key
    assert resumed.samples == full.samples
