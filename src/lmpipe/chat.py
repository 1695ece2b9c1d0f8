"""The chat template: how a conversation becomes the text the model reads, the same in training and serving.

It is a Jinja template in the Hugging Face convention (`tokenizer_config.json` beside `tokenizer.json`, key
`chat_template`), written by the `tokenize` stage and copied into every model directory and ONNX export, so
fine-tuning, evaluation and inference format prompts identically. A turn is `<|role|>content<|end|>`; a
prompt for generation ends with `<|assistant|>`, and the model learns to close its answer with `<|end|>`.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

from lmpipe.errors import LmpipeError
from lmpipe.formats import ASSISTANT, END, EOT, PAD, SYSTEM, TOKENIZER_CONFIG_FILE, USER

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


def tokenizer_config(template: str = CHAT_TEMPLATE) -> dict:
    """What `tokenizer_config.json` holds: the template and the special tokens it relies on."""
    return {"chat_template": template, "eos_token": END, "pad_token": PAD, "eot_token": EOT}


def load_chat_template(directory: str | os.PathLike) -> str:
    """The template saved beside a tokenizer (a tokens or model directory)."""
    path = Path(directory) / TOKENIZER_CONFIG_FILE
    if not path.is_file():
        raise LmpipeError(
            f"missing {path}: the chat template travels with the tokenizer (dvc repro tokenize)"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))["chat_template"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise LmpipeError(f"{path}: expected JSON with a 'chat_template' string ({exc})") from exc


@cache
def _compiled(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)


def render(messages: list[dict], add_generation_prompt: bool = False, template: str = CHAT_TEMPLATE) -> str:
    """Format a conversation ([{"role", "content"}, ...]) as model text."""
    for i, message in enumerate(messages):
        if message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise LmpipeError(
                f"message {i}: expected {{'role': one of {', '.join(ROLES)}, 'content': text}}, got {message!r:.80}"
            )
    return _compiled(template).render(messages=messages, add_generation_prompt=add_generation_prompt)


def prompt_text(prompt: str, template: str = CHAT_TEMPLATE, system: str | None = None) -> str:
    """A single-turn prompt ready for generation: the user turn, then the opened assistant turn."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    return render(messages, add_generation_prompt=True, template=template)
