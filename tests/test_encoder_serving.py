"""Tests for lmpipe.encoder.serving: ONNX Runtime classification without torch, input checks, and the
`lmpipe-classifier` pyfunc registered in MLflow."""

import json

import numpy as np
import pytest
from test_encoder_onnx import exported  # noqa: F401 (fixture)

from lmpipe.encoder.serving import CLASSIFIER_MODEL_NAME, OrtClassifier, register_classifier
from lmpipe.errors import LmpipeError


def test_ort_classifier_matches_torch_and_checks_input(exported):  # noqa: F811
    classifier, onnx_dir = exported
    ort_classifier = OrtClassifier(onnx_dir)
    texts = ["In the beginning", "Jesus wept."]
    result = ort_classifier.classify(texts)
    expected = classifier.predict_proba("book", texts)
    got = np.array(
        [[r["book"]["probabilities"][label] for label in classifier.label_sets["book"]] for r in result]
    )
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert set(result[0]) == {"testament", "book"} and set(ort_classifier.classify(texts, "book")[0]) == {
        "book"
    }
    with pytest.raises(LmpipeError, match="texts\\[1\\]: expected a non-empty string"):
        ort_classifier.classify(["ok", "  "])
    with pytest.raises(LmpipeError, match="task 'psalm': expected one of book, testament"):
        ort_classifier.classify(["ok"], "psalm")


@pytest.mark.slow  # logging a pyfunc with lmpipe's code takes ~10 s
def test_registered_pyfunc_returns_labels_and_probabilities(exported, tmp_path, monkeypatch):  # noqa: F811
    onnx_dir = exported[1]
    import mlflow
    import pandas as pd

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns.db'}")
    try:
        with mlflow.start_run():
            version = register_classifier(onnx_dir)
        model = mlflow.pyfunc.load_model(f"models:/{CLASSIFIER_MODEL_NAME}@champion")
        out = model.predict(pd.DataFrame({"text": ["Jesus wept."]}))
        assert version == "1" and list(out["task"]) == ["testament", "book"]
        assert abs(sum(json.loads(out["probabilities"][1]).values()) - 1) < 1e-5
    finally:
        mlflow.set_tracking_uri(None)
