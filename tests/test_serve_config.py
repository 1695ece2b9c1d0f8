import pytest

from lmpipe.errors import LmpipeError
from lmpipe.serve.config import ServeConfig


def test_serve_config_defaults():
    cfg = ServeConfig()
    assert (cfg.model, cfg.host, cfg.port) == ("models/onnx/teacher-int8", "127.0.0.1", 8000)
    assert (cfg.threads, cfg.max_prompt_tokens, cfg.max_tokens_limit, cfg.max_batch) == (0, 0, 256, 8)
    assert (cfg.max_running, cfg.max_queue, cfg.request_timeout, cfg.shutdown_timeout) == (16, 64, 60, 10)
    assert (cfg.max_body_bytes, cfg.api_key) == (1_000_000, "")


@pytest.mark.parametrize(
    "field, value",
    [
        ("model", ""),
        ("host", " "),
        ("port", 0),
        ("port", 70000),
        ("port", "80"),
        ("threads", -1),
        ("max_prompt_tokens", -1),
        ("max_tokens_limit", 0),
        ("max_batch", 0),
        ("max_batch", True),
        ("classifier", " "),
        ("max_running", 0),
        ("max_queue", 0),
        ("request_timeout", 0),
        ("request_timeout", float("inf")),
        ("shutdown_timeout", -1),
        ("max_body_bytes", 0),
        ("api_key", 5),
    ],
)
def test_serve_config_rejects_bad_fields(field, value):
    with pytest.raises(LmpipeError, match=rf"^serve\.{field}={value!r}: expected ") as err:
        ServeConfig(**{field: value})
    assert "\n" not in str(err.value)
