import json

import pytest

from lmpipe.errors import LmpipeError
from lmpipe.inference.onnx_dir import REQUIRED_KEYS, onnx_row, read_onnx_config


@pytest.fixture
def export_dir(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"graph")
    (tmp_path / "config.json").write_text(json.dumps({key: 1 for key in REQUIRED_KEYS} | {"opset": 20}))
    return tmp_path


def test_an_export_is_named_by_its_directory():
    assert onnx_row("teacher-int8") == "onnx-teacher-int8"


def test_the_config_is_read_whole(export_dir):
    assert read_onnx_config(export_dir)["opset"] == 20


@pytest.mark.parametrize("missing", ["model.onnx", "config.json"])
def test_a_missing_file_is_one_line_naming_it(export_dir, missing):
    (export_dir / missing).unlink()
    with pytest.raises(LmpipeError, match=rf"^missing .*{missing}: expected an ONNX export directory"):
        read_onnx_config(export_dir)


def test_broken_json_and_missing_keys_name_the_file(export_dir):
    config = export_dir / "config.json"
    config.write_text("{")
    with pytest.raises(LmpipeError, match=r"config.json is not valid JSON"):
        read_onnx_config(export_dir)
    config.write_text(json.dumps({"n_layer": 1}))
    with pytest.raises(LmpipeError, match=r"config.json lacks input_names, output_names, n_head"):
        read_onnx_config(export_dir)
