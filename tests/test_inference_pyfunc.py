import pandas as pd
import pytest
from registry_store import log_version, open_store, tiny_export

from lmpipe import registry
from lmpipe.inference.engine import OrtEngine
from lmpipe.inference.pyfunc import GENERATION_DEFAULTS, signature
from lmpipe.inference.sampling import DEFAULTS, GenerationParams
from lmpipe.registry import RegisterConfig

PROMPTS = ["In the beginning", "And the earth was", "God"]


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    return tiny_export(tmp_path_factory.mktemp("pyfunc"))


@pytest.fixture
def store(tmp_path, mlflow_template_db, monkeypatch):
    yield from open_store(tmp_path, mlflow_template_db, monkeypatch)


def test_predict_defaults_are_the_engines():
    assert GENERATION_DEFAULTS["max_tokens"] == DEFAULTS.max_new_tokens
    assert {k: GENERATION_DEFAULTS[k] for k in ("temperature", "top_k", "top_p", "seed", "stop")} == {
        "temperature": DEFAULTS.temperature,
        "top_k": DEFAULTS.top_k,
        "top_p": DEFAULTS.top_p,
        "seed": DEFAULTS.seed,
        "stop": DEFAULTS.stop,
    }
    params = {p.name: p.default for p in signature().params.params}
    assert params == GENERATION_DEFAULTS
    assert signature().outputs.input_names() == [
        "text",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
    ]


def test_the_champion_generates_what_the_engine_generates(onnx_dir, store):
    import mlflow

    cfg = RegisterConfig(variants=["tiny"], candidate="tiny")
    version = log_version(onnx_dir, store, cfg, 0.5)
    registry.promote(mlflow.MlflowClient(), cfg, version, 0.5)
    model = mlflow.pyfunc.load_model("models:/lmpipe@champion")
    engine = OrtEngine(onnx_dir, threads=1)

    out = model.predict(pd.DataFrame({"prompt": PROMPTS}), params={"max_tokens": 12})
    expected = engine.generate(PROMPTS, GenerationParams(max_new_tokens=12))
    assert out["text"].tolist() == [c.text for c in expected]
    assert out["completion_tokens"].tolist() == [c.completion_tokens for c in expected]
    assert out["finish_reason"].tolist() == [c.finish_reason for c in expected]
    assert len(set(out["text"])) == len(PROMPTS)  # the outputs depend on the prompt

    # A per-row column overrides the params for its row only.
    rows = model.predict(
        pd.DataFrame({"prompt": PROMPTS[:2], "max_tokens": [3, 7]}), params={"max_tokens": 12}
    )
    assert rows["completion_tokens"].tolist() == [3, 7]
    assert rows["text"][0] == engine.generate(PROMPTS[:1], GenerationParams(max_new_tokens=3))[0].text

    sampled = dict(max_tokens=10, temperature=1.0, top_k=20, seed=4)
    again = model.predict(pd.DataFrame({"prompt": PROMPTS}), params=sampled)
    expected = engine.generate(
        PROMPTS, GenerationParams(max_new_tokens=10, temperature=1.0, top_k=20, seed=4)
    )
    assert again["text"].tolist() == [c.text for c in expected]
