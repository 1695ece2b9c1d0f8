"""lmpipe.inference.batch and the `infer` stage on a tiny exported ONNX model."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from registry_store import tiny_export

from lmpipe.errors import LmpipeError
from lmpipe.inference.batch import InferConfig, read_prompts, run_batch
from lmpipe.inference.engine import OrtEngine
from lmpipe.inference.sampling import GenerationParams

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["In the beginning", "And the earth was", "God", "darkness upon", "the deep"]


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    return tiny_export(tmp_path_factory.mktemp("batch"))


@pytest.fixture(scope="module")
def engine(onnx_dir):
    return OrtEngine(onnx_dir, threads=1)


def held_out(directory: Path, prompts: list[str]) -> Path:
    """An instructions directory whose test.jsonl holds `prompts` as held-out examples."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({"id": f"x{i}", "task": "continue", "prompt": p, "response": "r"})
        for i, p in enumerate(prompts)
    ]
    (directory / "test.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_read_prompts_from_text_and_jsonl(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("first prompt\n\n  second, indented\r\nthird\n", encoding="utf-8")
    assert read_prompts(text) == [
        (f"{text}:1", "first prompt"),
        (f"{text}:3", "  second, indented"),
        (f"{text}:4", "third"),
    ]
    assert read_prompts(text, limit=2) == read_prompts(text)[:2]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a\\nb", "extra": 1}\n\n{"prompt": "c"}\n', encoding="utf-8")
    assert read_prompts(jsonl) == [(f"{jsonl}:1", "a\nb"), (f"{jsonl}:3", "c")]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.txt", None, r"prompts file .*missing.txt: no such file"),
        ("empty.txt", "\n \n", r"prompts file .*empty.txt: no prompts"),
        (
            "bad.jsonl",
            '{"prompt": "ok"}\n{"text": "no prompt"}\n',
            r"bad.jsonl:2: expected a JSON object with a non-empty",
        ),
        ("bad.jsonl", '{"prompt": "ok"}\n\n{"prompt": ""}\n', r"bad.jsonl:3: expected a JSON object"),
        ("bad.jsonl", '["prompt"]\n', r"bad.jsonl:1: expected a JSON object"),
        ("broken.jsonl", '{"prompt": "ok"\n', r"broken.jsonl:1: invalid JSON"),
        ("latin1.txt", b"caf\xe9\n", r"latin1.txt: not UTF-8 text"),
    ],
)
def test_bad_prompts_files_fail_with_one_line_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(LmpipeError, match=message) as error:
        read_prompts(path)
    assert "\n" not in str(error.value)


def test_run_batch_writes_what_the_engine_generates(onnx_dir, engine, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    out = tmp_path / "out" / "generations.jsonl"
    cfg = InferConfig(prompts=str(prompts), model=str(onnx_dir), max_tokens=10, batch_size=2, threads=1)
    stats = run_batch(cfg, out, tmp_path / "no-instructions")
    records = read_jsonl(out)
    expected = engine.generate(PROMPTS, GenerationParams(max_new_tokens=10))
    assert [r["prompt"] for r in records] == PROMPTS
    assert [r["text"] for r in records] == [c.text for c in expected]
    assert [r["completion_tokens"] for r in records] == [c.completion_tokens for c in expected]
    assert [r["finish_reason"] for r in records] == [c.finish_reason for c in expected]
    assert [r["source"] for r in records] == [f"{prompts}:{i}" for i in range(1, 6)]
    assert all(r["latency_ms"] > 0 for r in records)
    # Rows of one batch share its latency; the three batches (2 + 2 + 1) were timed apart.
    assert records[0]["latency_ms"] == records[1]["latency_ms"]
    assert stats["prompts"] == 5 and stats["completion_tokens"] == sum(c.completion_tokens for c in expected)
    assert stats["tokens_per_s"] == pytest.approx(stats["completion_tokens"] / stats["seconds"])
    assert sum(stats["finish_reasons"].values()) == 5
    assert stats["model_dir"] == str(onnx_dir)
    assert sorted(p.name for p in out.parent.iterdir()) == ["generations.jsonl"]  # no temp files left


def test_run_batch_defaults_to_the_first_held_out_examples(onnx_dir, engine, tmp_path):
    instructions = held_out(tmp_path / "instructions", PROMPTS)
    cfg = InferConfig(model=str(onnx_dir), limit=3, max_tokens=6, temperature=0.8, top_k=20, seed=3)
    run_batch(cfg, tmp_path / "g.jsonl", instructions)
    records = read_jsonl(tmp_path / "g.jsonl")
    assert [r["prompt"] for r in records] == PROMPTS[:3]
    expected = engine.generate(
        PROMPTS[:3], GenerationParams(max_new_tokens=6, temperature=0.8, top_k=20, seed=3)
    )
    assert [r["text"] for r in records] == [c.text for c in expected]
    assert records[0]["source"] == f"{instructions / 'test.jsonl'}:1"


def test_run_batch_with_raw_text_does_not_apply_the_chat_template(onnx_dir, engine, tmp_path):
    instructions = held_out(tmp_path / "instructions", PROMPTS[:2])
    run_batch(InferConfig(model=str(onnx_dir), chat=False, max_tokens=5), tmp_path / "g.jsonl", instructions)
    expected = engine.generate(PROMPTS[:2], GenerationParams(max_new_tokens=5), chat=False)
    records = read_jsonl(tmp_path / "g.jsonl")
    assert [r["text"] for r in records] == [c.text for c in expected]
    assert [r["prompt_tokens"] for r in records] == [c.prompt_tokens for c in expected]


def test_an_over_long_prompt_fails_before_anything_is_written(onnx_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("God\n" + "the earth " * 40 + "\n", encoding="utf-8")
    out = tmp_path / "g.jsonl"
    with pytest.raises(
        LmpipeError, match=rf"{prompts}:2: prompt of \d+ tokens \+ infer.max_tokens=8 exceeds"
    ):
        run_batch(InferConfig(prompts=str(prompts), model=str(onnx_dir), max_tokens=8), out, tmp_path)
    assert not out.exists()


def test_a_missing_model_is_one_line(tmp_path):
    held_out(tmp_path, ["God"])
    with pytest.raises(LmpipeError, match=r"missing model directory .*nowhere: build it"):
        run_batch(InferConfig(model=str(tmp_path / "nowhere")), tmp_path / "g.jsonl", tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"limit": 0}, r"infer.limit=0: expected a value greater than or equal to 1"),
        ({"top_p": 1.5}, r"infer.top_p=1.5: expected a value less than or equal to 1"),
        ({"max_tokens": 0}, r"infer.max_tokens=0"),
        ({"batch_size": True}, r"infer.batch_size=True"),
        ({"model": ""}, r"infer.model='': expected a directory or a models:/ URI"),
    ],
)
def test_infer_config_rejects_bad_fields(kwargs, message):
    with pytest.raises(LmpipeError, match=message):
        InferConfig(**kwargs)


def load_stage(name: str):
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_infer_stage_runs_a_registered_champion(onnx_dir, engine, tmp_path, mlflow_template_db, monkeypatch):
    """The stage end to end: a version logged and promoted, then `infer` resolves models:/lmpipe@champion."""
    import mlflow

    from lmpipe import registry

    monkeypatch.chdir(tmp_path)  # stage_run's git lookups and relative paths stay out of the repository
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    shutil.copyfile(mlflow_template_db, tmp_path / "mlruns.db")
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cfg = OmegaConf.create(
        {
            "paths": {
                "instructions": str(held_out(tmp_path / "instructions", PROMPTS)),
                "generations": "g.jsonl",
            },
            "infer": {"_target_": "lmpipe.inference.batch.InferConfig", "limit": 2, "max_tokens": 5},
            "logger": {
                "_target_": "lmpipe.tracking.TrackingConfig",
                "tracking_uri": uri,
                "experiment_name": "infer-test",
                "artifact_location": str(tmp_path / "art"),
            },
        }
    )
    try:
        mlflow.set_tracking_uri(uri)
        rcfg = registry.RegisterConfig(variants=["tiny"], candidate="tiny")
        with mlflow.start_run(experiment_id=mlflow.create_experiment("setup", (tmp_path / "art").as_uri())):
            version = registry.log_model(onnx_dir, rcfg, {}, "card")
        registry.promote(mlflow.MlflowClient(), rcfg, version, 0.5)
        load_stage("infer").main(cfg)
    finally:
        mlflow.set_tracking_uri(None)
    records = read_jsonl(tmp_path / "g.jsonl")
    expected = engine.generate(PROMPTS[:2], GenerationParams(max_new_tokens=5))
    assert [r["text"] for r in records] == [c.text for c in expected]
    assert (tmp_path / "cache" / "lmpipe" / "models" / "lmpipe").is_dir()
    client = mlflow.MlflowClient(uri)
    [run] = client.search_runs(
        [client.get_experiment_by_name("infer-test").experiment_id], "tags.`lmpipe.stage` = 'infer'"
    )
    assert run.data.metrics["prompts"] == 2 and run.data.params["infer.limit"] == "2"
    assert run.data.tags["lmpipe.model_dir"].startswith(str(tmp_path / "cache"))
