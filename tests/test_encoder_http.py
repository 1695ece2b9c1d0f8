"""Tests for lmpipe.encoder.http on the server (`create_app`, `lmpipe serve --classifier`): POST /v1/classify
answers labels with probabilities; bad input is a 400 with a one-line message; without a classifier the route
is a 404."""

import pytest
from fastapi.testclient import TestClient

from lmpipe.encoder.serving import MAX_TEXTS, OrtClassifier
from lmpipe.serve import ServeConfig, create_app


class Engine:
    """What the server reads of an engine before a generation request: its name and context."""

    name, block_size, template = "stub", 64, None


@pytest.fixture(scope="module")
def classifier(onnx_classifier):
    return OrtClassifier(onnx_classifier[1])


@pytest.fixture(scope="module")
def client(classifier):
    with TestClient(create_app(Engine(), ServeConfig(), classifier)) as client:
        yield client


def test_classify_returns_labels_and_probabilities(client, classifier):
    body = client.post("/v1/classify", json={"input": ["Jesus wept.", "And God said"], "task": "book"}).json()
    assert [d["index"] for d in body["data"]] == [0, 1] and body["data"][1]["text"] == "And God said"
    answer = body["data"][0]["book"]
    assert answer == classifier.classify(["Jesus wept."], "book")[0]["book"]
    assert (
        answer["label"] in answer["probabilities"] and abs(sum(answer["probabilities"].values()) - 1) < 1e-5
    )
    single = client.post("/v1/classify", json={"input": "Jesus wept."}).json()
    assert set(single["data"][0]) == {"index", "text", "testament", "book"}
    assert client.get("/health").json()["model"] == "stub"  # the generation routes are still there


@pytest.mark.parametrize(
    "body, message, param",
    [
        ({"input": ""}, "input is empty: expected text to classify", "input"),
        ({"input": ["ok", "  "]}, "input[1] is empty: expected text to classify", "input"),
        ({"input": []}, f"input has 0 texts: expected 1 to {MAX_TEXTS}", "input"),
        ({"input": ["ok"] * (MAX_TEXTS + 1)}, f"input has {MAX_TEXTS + 1} texts: expected 1 to", "input"),
        ({"input": "ok", "task": "psalm"}, "task 'psalm': expected one of book, testament", "task"),
        ({"input": ["ok", 3]}, "input", "input"),
        ({"input": 3}, "input", "input"),
        ({"input": "ok", "task": 1}, "task=1", "task"),
        ({"text": "ok"}, "input: Field required; text: unsupported parameter", "input"),
    ],
)
def test_bad_input_is_a_400_with_one_line(client, body, message, param):
    response = client.post("/v1/classify", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error["message"] and "\n" not in error["message"] and error["param"] == param


def test_without_a_classifier_classify_is_a_404():
    with TestClient(create_app(Engine(), ServeConfig())) as client:
        response = client.post("/v1/classify", json={"input": "Jesus wept."})
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_serve_loads_the_configured_classifier(onnx_classifier, tmp_path, monkeypatch):
    import uvicorn

    from lmpipe.inference import engine
    from lmpipe.serve.app import serve

    class StubEngine(Engine):
        def __init__(self, model_dir, threads):
            pass

    apps = []
    monkeypatch.setattr(engine, "OrtEngine", StubEngine)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: apps.append(app))
    gpt_dir = tmp_path / "gpt"
    gpt_dir.mkdir()
    serve(ServeConfig(model=str(gpt_dir), classifier=str(onnx_classifier[1]), threads=1))
    serve(ServeConfig(model=str(gpt_dir)))
    with TestClient(apps[0]) as client:
        assert client.post("/v1/classify", json={"input": "Jesus wept."}).status_code == 200
    with TestClient(apps[1]) as client:
        assert client.post("/v1/classify", json={"input": "Jesus wept."}).status_code == 404
