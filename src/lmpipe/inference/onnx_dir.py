"""An ONNX export directory (written by `lmpipe.export`, `lmpipe.compress`): its config.json, read in one place.

The engine, the quantizer, the registry and the model card all open an export through `read_onnx_config`, so
they agree on what makes a directory an export and fail with the same one-line message when it is not.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lmpipe.errors import LmpipeError
from lmpipe.formats import ONNX_CONFIG_FILE, ONNX_FILE

REQUIRED_KEYS = (
    "input_names",
    "output_names",
    "n_layer",
    "n_head",
    "head_dim",
    "vocab_size",
    "block_size",
    "end_id",
    "eot_id",
    "pad_id",
    "variant",
)
"""What every reader of config.json relies on (the export writes more: model, opset, quantization, ...)."""


def onnx_row(directory_name: str) -> str:
    """The name an export directory goes by in evaluate.json's tables (and so in the registry): onnx-<name>."""
    return f"onnx-{directory_name}"


def read_onnx_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """config.json of the export in `model_dir`, after checking the graph and every required key are there."""
    model_dir = Path(model_dir)
    config_path = model_dir / ONNX_CONFIG_FILE
    for path in (model_dir / ONNX_FILE, config_path):
        if not path.is_file():
            raise LmpipeError(f"missing {path}: expected an ONNX export directory (stages export, quantize)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LmpipeError(f"{config_path} is not valid JSON: {exc}") from exc
    missing = [key for key in REQUIRED_KEYS if key not in config]
    if missing:
        raise LmpipeError(
            f"{config_path} lacks {', '.join(missing)}: expected a config written by lmpipe.export"
        )
    return config
