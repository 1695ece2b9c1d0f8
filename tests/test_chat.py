import json
import subprocess
import sys

import pytest

from lmpipe import chat
from lmpipe.errors import LmpipeError
from lmpipe.formats import TOKENIZER_CONFIG_FILE
from lmpipe.tokenizer import TokenizerConfig, copy_tokenizer, train_tokenizer, write_shards


def test_render_single_turn_and_generation_prompt():
    assert chat.prompt_text("Which book?") == "<|user|>Which book?<|end|><|assistant|>"
    text = chat.render([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    assert text == "<|user|>a<|end|><|assistant|>b<|end|>"
    with_system = chat.prompt_text("q", system="be brief")
    assert with_system == "<|system|>be brief<|end|><|user|>q<|end|><|assistant|>"


@pytest.mark.parametrize("message", [{"role": "robot", "content": "x"}, {"role": "user", "content": 3}, {}])
def test_render_rejects_bad_messages(message):
    with pytest.raises(LmpipeError, match="message 0"):
        chat.render([message])


def test_template_travels_with_the_tokenizer(tmp_path):
    tok = train_tokenizer(["in the beginning was the word"] * 3, TokenizerConfig(kind="char", vocab_size=64))
    write_shards(tmp_path / "tokens", {"train": ["in the"]}, tok)
    (tmp_path / "model").mkdir()
    copy_tokenizer(tmp_path / "tokens", tmp_path / "model")
    template = chat.load_chat_template(tmp_path / "model")
    assert template == chat.CHAT_TEMPLATE
    config = json.loads((tmp_path / "model" / TOKENIZER_CONFIG_FILE).read_text())
    assert config["eos_token"] == "<|end|>" and config["pad_token"] == "<|pad|>"


def test_missing_template_names_the_file(tmp_path):
    with pytest.raises(LmpipeError, match="tokenizer_config.json"):
        chat.load_chat_template(tmp_path)
    with pytest.raises(LmpipeError, match="tokenize"):
        copy_tokenizer(tmp_path, tmp_path / "elsewhere")


def test_chat_takes_the_special_tokens_from_formats_not_from_the_tokenizer():
    # The tokenizer writes the chat template, so chat importing the tokenizer back would be a cycle.
    code = "import sys, lmpipe.chat; sys.exit('lmpipe.tokenizer' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
