"""Tests for lmpipe.encoder.http: POST /v1/classify answers labels with probabilities; bad input is a 400."""

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from test_encoder_onnx import exported  # noqa: F401 (fixture)

from lmpipe.encoder.http import classify_router
from lmpipe.encoder.serving import OrtClassifier
from lmpipe.serve.errors import HANDLERS


@pytest.fixture(scope="module")
def client(exported):  # noqa: F811
    app = FastAPI(exception_handlers=HANDLERS)
    app.include_router(classify_router(OrtClassifier(exported[1])))
    return TestClient(app)


def test_classify_returns_labels_and_probabilities(client):
    body = client.post("/v1/classify", json={"input": ["Jesus wept.", "And God said"], "task": "book"}).json()
    assert [d["index"] for d in body["data"]] == [0, 1]
    answer = body["data"][0]["book"]
    assert (
        answer["label"] in answer["probabilities"] and abs(sum(answer["probabilities"].values()) - 1) < 1e-5
    )
    single = client.post("/v1/classify", json={"input": "Jesus wept."}).json()
    assert set(single["data"][0]) == {"index", "text", "testament", "book"}


@pytest.mark.parametrize(
    "body",
    [{"input": ""}, {"input": ["ok", 3]}, {"input": "ok", "task": "psalm"}, {"text": "ok"}, {"input": []}],
)
def test_bad_input_is_a_400(client, body):
    response = client.post("/v1/classify", json=body)
    assert response.status_code == 400 and "error" in response.json()
