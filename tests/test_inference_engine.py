import json
import shutil
import subprocess
import sys

import pytest
import torch
from tiny_models import export_tiny_model

from lmpipe.errors import LmpipeError
from lmpipe.export import ExportConfig
from lmpipe.inference.engine import OrtEngine, _stable_length
from lmpipe.inference.sampling import GenerationParams

PROMPTS = ["In the beginning", "And the earth was without form, and void; and", "God", "Israel came"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(torch model, export directory, engine) of a tiny GPT, exported once for the module. Learned positions:
    rotary attention only sees relative positions, so it would hide a wrong offset in left-padded rows."""
    root = tmp_path_factory.mktemp("engine")
    _, model = export_tiny_model(
        root,
        root / "onnx",
        ExportConfig(parity_decode_steps=2),
        variant_name="tiny",
        pos_encoding="learned",
        seed=0,
    )
    return model, root / "onnx", OrtEngine(root / "onnx", threads=1)


def torch_greedy(model, engine, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """PyTorch's greedy continuation (GPT.generate), cut before the first END or EOT as the engine stops."""
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens, temperature=0)[0, len(prompt_ids) :]
    ids = out.tolist()
    stops = [i for i, t in enumerate(ids) if t in (engine.config["end_id"], engine.config["eot_id"])]
    return ids[: stops[0]] if stops else ids


def late_stop(text: str) -> str:
    """A 3-character piece of `text` that first occurs after its 10th character (and has no partial bytes)."""
    for i in range(10, len(text) - 3):
        piece = text[i : i + 3]
        if text.find(piece) == i and "\ufffd" not in piece:
            return piece
    raise AssertionError(f"no late stop sequence in {text!r}")


def test_engine_exposes_the_export_config(exported):
    _, export_dir, engine = exported
    assert engine.name == "tiny"
    assert (engine.block_size, engine.vocab_size) == (64, engine.tokenizer.get_vocab_size())
    assert engine.config == json.loads((export_dir / "config.json").read_text())
    assert "<|assistant|>" in engine.template


@pytest.mark.parametrize("chat", [True, False])
def test_greedy_output_equals_torch_generate_token_for_token(exported, chat):
    model, _, engine = exported
    params = GenerationParams(max_new_tokens=24)
    for prompt in PROMPTS:
        prompt_ids = engine.encode_prompt(prompt, chat=chat)
        [completion] = engine.generate([prompt], params, chat=chat)
        expected = torch_greedy(model, engine, prompt_ids, 24)
        assert completion.token_ids == expected
        assert len(set(expected)) > 3  # the model is context-sensitive, not stuck on one token
        assert completion.prompt_tokens == len(prompt_ids)
        assert completion.text == engine.tokenizer.decode(expected, skip_special_tokens=True)


def test_a_left_padded_batch_generates_what_each_prompt_generates_alone(exported):
    model, _, engine = exported
    params = GenerationParams(max_new_tokens=20)
    prompt_ids = [engine.encode_prompt(p) for p in PROMPTS]
    assert len({len(ids) for ids in prompt_ids}) == len(PROMPTS)
    batched = engine.generate_ids(prompt_ids, params)
    assert batched == [torch_greedy(model, engine, ids, 20) for ids in prompt_ids]


def test_rows_finishing_early_leave_the_others_unchanged(exported):
    _, _, engine = exported
    alone = engine.generate(PROMPTS, GenerationParams(max_new_tokens=20))
    # A stop sequence from one row's text ends that row mid-batch; the others run on without it.
    stop = alone[0].text[3:6]
    params = GenerationParams(max_new_tokens=20, stop=[stop])
    batched = engine.generate(PROMPTS, params)
    assert batched[0].finish_reason == "stop" and len(batched[0].token_ids) < 20
    assert any(c.finish_reason == "length" for c in batched)
    assert batched == [engine.generate([p], params)[0] for p in PROMPTS]


def test_max_new_tokens_ends_with_finish_reason_length(exported):
    _, _, engine = exported
    [c] = engine.generate(["In the beginning"], GenerationParams(max_new_tokens=7))
    assert (c.finish_reason, c.completion_tokens, len(c.token_ids)) == ("length", 7, 7)


def test_a_stop_sequence_ends_generation_and_is_cut_from_the_text(exported):
    _, _, engine = exported
    [full] = engine.generate(["In the beginning"], GenerationParams(max_new_tokens=30))
    stop = full.text[6:9]
    cut = full.text.index(stop)
    [c] = engine.generate(["In the beginning"], GenerationParams(max_new_tokens=30, stop=["zzzz", stop]))
    assert c.finish_reason == "stop"
    assert c.text == full.text[:cut]
    assert full.token_ids[: len(c.token_ids)] == c.token_ids and len(c.token_ids) < 30


def test_end_token_ends_generation_with_finish_reason_stop(exported, tmp_path):
    _, export_dir, engine = exported
    [full] = engine.generate(["In the beginning"], GenerationParams(max_new_tokens=10))
    # Declare the model's 4th greedy token to be <|end|>: generation must stop right before it.
    patched = tmp_path / "onnx"
    shutil.copytree(export_dir, patched)
    config = json.loads((patched / "config.json").read_text())
    config["end_id"] = full.token_ids[3]
    (patched / "config.json").write_text(json.dumps(config))
    [c] = OrtEngine(patched).generate(["In the beginning"], GenerationParams(max_new_tokens=10))
    first = full.token_ids.index(full.token_ids[3])
    assert (c.finish_reason, c.token_ids) == ("stop", full.token_ids[:first])


@pytest.mark.parametrize("stop", [[], ["zzzz"], None])
def test_stream_deltas_concatenate_to_the_generated_text(exported, stop):
    _, _, engine = exported
    [full] = engine.generate(["And the earth"], GenerationParams(max_new_tokens=30))
    params = GenerationParams(max_new_tokens=30, stop=stop if stop is not None else [late_stop(full.text)])
    [expected] = engine.generate(["And the earth"], params)
    deltas = list(engine.stream("And the earth", params))
    assert "".join(d.text for d in deltas) == expected.text
    assert len(deltas) > 3 and all(d.text for d in deltas[:-1])
    # Only the last delta says why the completion ended, as `generate` does.
    assert [d.finish_reason for d in deltas] == [None] * (len(deltas) - 1) + [expected.finish_reason]


def test_stream_holds_back_incomplete_characters_and_possible_stop_starts():
    assert _stable_length("abc\ufffd", []) == 3
    assert _stable_length("abc", ["cd"]) == 2
    assert _stable_length("abcd", ["bcx", "dy"]) == 3
    assert _stable_length("abc", ["xyz"]) == 3
    assert _stable_length("ab\ufffd", ["b\u20ac"]) == 1


def test_seeded_sampling_is_reproducible(exported):
    _, _, engine = exported
    params = GenerationParams(max_new_tokens=20, temperature=1.0, top_k=50, seed=5)
    first = engine.generate(PROMPTS[:2], params)
    assert engine.generate(PROMPTS[:2], params) == first
    other = engine.generate(
        PROMPTS[:2], GenerationParams(max_new_tokens=20, temperature=1.0, top_k=50, seed=6)
    )
    assert [c.token_ids for c in other] != [c.token_ids for c in first]


def test_prompt_that_leaves_no_room_raises_naming_the_numbers(exported):
    _, _, engine = exported
    n = len(engine.encode_prompt("In the beginning"))
    with pytest.raises(
        LmpipeError, match=rf"prompt 0 of {n} tokens \+ max_new_tokens={65 - n} exceeds block_size=64"
    ):
        engine.generate(["In the beginning"], GenerationParams(max_new_tokens=65 - n))
    assert engine.generate(["In the beginning"], GenerationParams(max_new_tokens=64 - n))[0].finish_reason


def test_empty_prompt_raises(exported):
    _, _, engine = exported
    with pytest.raises(LmpipeError, match="expected non-empty text"):
        engine.generate([""], GenerationParams())
    with pytest.raises(LmpipeError, match="no tokens"):
        engine.generate_ids([[]], GenerationParams())


def test_missing_export_directory_raises(tmp_path):
    with pytest.raises(LmpipeError, match=r"missing .*model.onnx"):
        OrtEngine(tmp_path)


def test_the_engine_runs_without_importing_torch(exported):
    _, export_dir, _ = exported
    code = (
        "import sys\n"
        "from lmpipe.inference.engine import OrtEngine\n"
        "from lmpipe.inference.sampling import GenerationParams\n"
        "from lmpipe.evaluation.ort_scorer import OrtScorer\n"
        f"engine = OrtEngine({str(export_dir)!r})\n"
        "print(engine.generate(['In the beginning'], GenerationParams(max_new_tokens=3))[0].completion_tokens)\n"
        "print(OrtScorer(engine).label_probs(['Which?'], ['a', 'b']).shape)\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["3", "(1,", "2)", "False"]
