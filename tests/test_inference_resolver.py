import pytest
from registry_store import fake_version, log_version, open_store, tiny_export

from lmpipe import registry
from lmpipe.errors import LmpipeError
from lmpipe.inference.resolver import default_cache_dir, resolve_model
from lmpipe.registry import RegisterConfig


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    return tiny_export(tmp_path_factory.mktemp("resolver"))


@pytest.fixture
def store(tmp_path, mlflow_template_db, monkeypatch):
    yield from open_store(tmp_path, mlflow_template_db, monkeypatch)


def test_a_local_directory_is_itself_and_a_missing_one_says_how_to_build_it(tmp_path):
    assert resolve_model(str(tmp_path)) == tmp_path
    with pytest.raises(
        LmpipeError, match=r"missing model directory .*nope: build it with `dvc repro export`"
    ) as err:
        resolve_model(tmp_path / "nope")
    assert "dvc repro quantize" in str(err.value) and "models:/<name>@<alias>" in str(err.value)


def test_a_local_directory_needs_no_mlflow(tmp_path):
    import subprocess
    import sys

    code = f"import sys; from lmpipe.inference.resolver import resolve_model; resolve_model({str(tmp_path)!r}); print('mlflow' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (run.returncode, run.stdout) == (0, "False\n")


def test_the_cache_follows_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "lmpipe" / "models"


def test_resolve_model_by_alias_version_and_path(onnx_dir, store, tmp_path, monkeypatch):
    import mlflow

    cfg = RegisterConfig(variants=["tiny"], candidate="tiny")
    version = log_version(onnx_dir, store, cfg, 0.5)
    registry.promote(mlflow.MlflowClient(), cfg, version, 0.5)
    cache = tmp_path / "cache"
    by_alias = resolve_model("models:/lmpipe@champion", cache_dir=cache)
    assert by_alias.parent.parent.parent == cache / "lmpipe"
    assert sorted(p.name for p in by_alias.iterdir()) == sorted(p.name for p in onnx_dir.iterdir())
    assert (by_alias / "model.onnx").read_bytes() == (onnx_dir / "model.onnx").read_bytes()

    # The second resolution reuses the download.
    def no_download(**kwargs):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", no_download)
    assert resolve_model("models:/lmpipe/1", cache_dir=cache) == by_alias
    assert resolve_model(str(onnx_dir)) == onnx_dir
    assert resolve_model(onnx_dir) == onnx_dir


def test_resolve_model_errors_are_one_line(store, tmp_path):
    import mlflow

    with pytest.raises(
        LmpipeError, match=r"missing model directory .*nowhere: build it with `dvc repro export`"
    ) as missing:
        resolve_model(tmp_path / "nowhere")
    with pytest.raises(
        LmpipeError, match=r"model 'models:/lmpipe@champion' not found in sqlite:"
    ) as no_model:
        resolve_model("models:/lmpipe@champion", cache_dir=tmp_path)
    client = mlflow.MlflowClient()
    cfg = RegisterConfig(variants=["tiny"], candidate="tiny")
    fake_version(client, cfg, tmp_path, 0.5)
    with pytest.raises(LmpipeError, match=r"'models:/lmpipe@champion' not found .*champion") as no_alias:
        resolve_model("models:/lmpipe@champion", cache_dir=tmp_path)
    with pytest.raises(LmpipeError, match=r"'models:/lmpipe/7' not found") as no_version:
        resolve_model("models:/lmpipe/7", cache_dir=tmp_path)
    with pytest.raises(LmpipeError, match=r"expected models:/<name>@<alias> or models:/<name>/<version>"):
        resolve_model("models:/lmpipe", cache_dir=tmp_path)
    for error in (missing, no_model, no_alias, no_version):
        assert "\n" not in str(error.value)
