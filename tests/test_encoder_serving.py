"""Tests for the encoder classifier at serving time: ONNX Runtime classification without torch and its input
checks (lmpipe.encoder.serving), its int8 copy checked against fp32 (lmpipe.encoder.quantize), finding it from
a directory or the registry (lmpipe.encoder.resolve), `lmpipe classify`, and the `lmpipe-classifier` pyfunc."""

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import pandas as pd
import pytest
from registry_store import open_store
from tiny_models import write_label_examples

from lmpipe import cli
from lmpipe.compress import QuantizeConfig
from lmpipe.encoder.quantize import classifier_agreement, held_out_texts, quantize_classifier
from lmpipe.encoder.resolve import resolve_classifier
from lmpipe.encoder.serving import CLASSIFIER_MODEL_NAME, MAX_TEXTS, OrtClassifier, register_classifier
from lmpipe.errors import LmpipeError
from lmpipe.formats import CLASSIFIER_INT8_DIR, ONNX_CONFIG_FILE, ONNX_FILE, TOKENIZER_FILE

TEXTS = ["In the beginning", "Jesus wept.", "And God said, Let there be light: and there was light."] * 4


@pytest.fixture(scope="module")
def int8(onnx_classifier, tmp_path_factory):
    """(int8 directory, quantize_classifier's report) of the session's tiny ONNX classifier."""
    out = tmp_path_factory.mktemp("classifier") / "classifier-int8"
    return out, quantize_classifier(onnx_classifier[1], out, QuantizeConfig(), TEXTS)


def test_ort_classifier_matches_torch_and_checks_input(onnx_classifier):
    classifier, onnx_dir = onnx_classifier
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


@pytest.mark.filterwarnings("ignore:.* were truncated")
def test_concurrent_calls_give_the_serial_answers(onnx_classifier):
    # Each call changes the tokenizer's truncation: the server's threadpool must not see another call's.
    ort_classifier = OrtClassifier(onnx_classifier[1])
    batches = [["x " * 200, "Jesus wept."], ["In the beginning"], ["y " * 150]] * 8
    serial = [ort_classifier.classify(b) for b in batches]
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(ort_classifier.classify, batches)) == serial


# --- int8 ---------------------------------------------------------------------------------------------------


def test_int8_classifier_is_smaller_agrees_with_fp32_and_serves(onnx_classifier, int8):
    fp32_dir = onnx_classifier[1]
    out, report = int8
    assert report["dst_bytes"] == (out / ONNX_FILE).stat().st_size and report["ratio"] < 0.4
    config = json.loads((out / ONNX_CONFIG_FILE).read_text())
    assert config["quantization"] == "dynamic-int8" and config["quantized_from"] == str(fp32_dir)
    assert config["agreement"] == report["agreement"] and report["agreement"]["texts"] == len(TEXTS)
    assert (out / TOKENIZER_FILE).read_bytes() == (fp32_dir / TOKENIZER_FILE).read_bytes()
    # The embedding tables are stored in 8 bits too: no fp32 matrix is left in the graph.
    matrices = [i for i in onnx.load(out / ONNX_FILE).graph.initializer if len(i.dims) == 2]
    assert matrices and all(i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) for i in matrices)
    fp32, quantized = OrtClassifier(fp32_dir), OrtClassifier(out)
    expected, got = fp32.probabilities(TEXTS), quantized.probabilities(TEXTS)
    for task, stats in report["agreement"]["tasks"].items():
        same = np.mean(expected[task].argmax(1) == got[task].argmax(1))
        assert stats["label_agreement"] == pytest.approx(same) and stats["label_agreement"] >= 0.75
        assert stats["max_abs_prob_diff"] == pytest.approx(np.abs(expected[task] - got[task]).max())
    assert classifier_agreement(fp32, fp32, TEXTS)["tasks"]["book"] == {
        "label_agreement": 1.0,
        "max_abs_prob_diff": 0.0,
    }


def test_int8_errors_leave_the_destination_untouched(onnx_classifier, int8, tmp_path):
    fp32_dir, (int8_dir, _) = onnx_classifier[1], int8
    dst = tmp_path / "classifier-int8"
    dst.mkdir()
    (dst / "keep").write_text("previous output")
    with pytest.raises(LmpipeError, match="quantization='dynamic-int8': expected an fp32 classifier export"):
        quantize_classifier(int8_dir, dst, QuantizeConfig(), TEXTS)
    # The check fails on the finished directory, before it replaces the destination.
    with pytest.raises(LmpipeError, match=r"texts\[1\]: expected a non-empty string"):
        quantize_classifier(fp32_dir, dst, QuantizeConfig(), ["ok", " "])
    with pytest.raises(LmpipeError, match="expected an ONNX encoder classifier directory"):
        quantize_classifier(tmp_path / "nowhere", dst, QuantizeConfig(), TEXTS)
    assert [p.name for p in dst.iterdir()] == ["keep"] and sorted(p.name for p in tmp_path.iterdir()) == [
        "classifier-int8"
    ]


def test_held_out_texts_are_the_test_verses_of_the_label_tasks(tmp_path):
    write_label_examples(tmp_path)
    assert held_out_texts(tmp_path, 10) == ["Verse 0 (test).", "Verse 1 (test).", "Verse 2 (test)."]
    assert held_out_texts(tmp_path, 2) == ["Verse 0 (test).", "Verse 2 (test)."]


# --- resolving and `lmpipe classify` -------------------------------------------------------------------------


def test_resolve_classifier_takes_a_directory_or_an_encoder_directory(onnx_classifier, tmp_path):
    onnx_dir = onnx_classifier[1]
    assert resolve_classifier(onnx_dir) == onnx_dir
    shutil.copytree(onnx_dir, tmp_path / "encoder" / "onnx")
    assert resolve_classifier(tmp_path / "encoder") == tmp_path / "encoder" / "onnx"
    with pytest.raises(
        LmpipeError, match="missing classifier directory .*: build it with `dvc repro quantize`"
    ):
        resolve_classifier(tmp_path / "nowhere")
    with pytest.raises(LmpipeError, match="expected models:/<name>@<alias>"):
        resolve_classifier("models:/")


def test_classify_and_register_default_to_the_quantize_stages_classifier():
    from lmpipe.registry import RegisterConfig

    assert cli.DEFAULT_CLASSIFIER == RegisterConfig().classifier == f"models/onnx/{CLASSIFIER_INT8_DIR}"


def test_classify_prints_one_json_line_per_text(onnx_classifier, capsys):
    onnx_dir = onnx_classifier[1]
    texts = ["Jesus wept.", "In the beginning"]
    assert cli.main(["classify", "--classifier", str(onnx_dir), "--threads", "1", *texts]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = OrtClassifier(onnx_dir).classify(texts)
    assert lines == [{"text": t, **r} for t, r in zip(texts, expected, strict=True)]
    assert cli.main(["classify", "--classifier", str(onnx_dir), "--task", "book", "Jesus wept."]) == 0
    [line] = capsys.readouterr().out.splitlines()
    assert set(json.loads(line)) == {"text", "book"}
    assert cli.main(["classify", "--classifier", str(onnx_dir), "--task", "psalm", "Jesus wept."]) == 2
    out, err = capsys.readouterr()
    assert (out, err) == ("", "lmpipe classify: error: task 'psalm': expected one of book, testament\n")


def test_classify_loads_no_torch_and_says_how_to_build_a_missing_classifier(onnx_classifier, tmp_path):
    code = (
        "import sys; from lmpipe import cli; code = cli.main(sys.argv[1:]); "
        "print([m for m in ('torch', 'lightning', 'fastapi') if m in sys.modules]); sys.exit(code)"
    )
    args = [sys.executable, "-c", code, "classify", "--threads", "1"]
    run = subprocess.run(
        [*args, "--classifier", str(onnx_classifier[1]), "Jesus wept."], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    answer, imported = run.stdout.splitlines()
    assert json.loads(answer)["text"] == "Jesus wept." and imported == "[]"
    run = subprocess.run([*args, "Jesus wept."], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2
    [line] = run.stderr.splitlines()
    assert line.startswith(
        "lmpipe classify: error: missing classifier directory models/onnx/classifier-int8: "
    )


# --- the registered model -----------------------------------------------------------------------------------


@pytest.mark.slow  # logging a pyfunc with lmpipe's code, then loading it back, takes ~5 s
def test_registered_pyfunc_returns_labels_and_probabilities(
    onnx_classifier, tmp_path, mlflow_template_db, monkeypatch
):
    onnx_dir = onnx_classifier[1]
    import mlflow

    for uri, experiment in open_store(tmp_path, mlflow_template_db, monkeypatch):
        with mlflow.start_run(experiment_id=experiment):
            version = register_classifier(onnx_dir, tags={"variant": "onnx"}, description="card")
        model = mlflow.pyfunc.load_model(f"models:/{CLASSIFIER_MODEL_NAME}@champion")
        out = model.predict(pd.DataFrame({"text": ["Jesus wept."]}))
        assert version == "1" and list(out["task"]) == ["testament", "book"]
        many = model.predict(pd.DataFrame({"text": [f"verse {i}" for i in range(MAX_TEXTS + 3)]}))
        assert len(many) == 2 * (MAX_TEXTS + 3) and many["text"].iloc[-1] == f"verse {MAX_TEXTS + 2}"
        assert abs(sum(json.loads(out["probabilities"][1]).values()) - 1) < 1e-5
        registered = mlflow.MlflowClient().get_model_version(CLASSIFIER_MODEL_NAME, "1")
        assert registered.tags["variant"] == "onnx" and registered.description == "card"
        # What `lmpipe classify` and `lmpipe serve --classifier` load from the registry.
        resolved = resolve_classifier(
            f"models:/{CLASSIFIER_MODEL_NAME}@champion", cache_dir=tmp_path / "cache", tracking_uri=uri
        )
        assert (resolved / ONNX_FILE).read_bytes() == (onnx_dir / ONNX_FILE).read_bytes()
