"""The encoder's tokenizer: a Hugging Face `tokenizers` file plus what the encoder needs to know about it.

A WordPiece tokenizer (the pretrained encoder's) wraps every text in [CLS] ... [SEP] by its own
post-processor; truncation keeps those and cuts the text, and `Encoding.overflowing` tells that it did.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from lmpipe.errors import LmpipeError


@dataclass
class EncoderTokenizer:
    tokenizer: Tokenizer
    pad_id: int
    source: str
    """Where the tokenizer came from, for messages."""

    @classmethod
    def from_file(cls, path: str | os.PathLike, pad_token: str) -> EncoderTokenizer:
        path = Path(path)
        if not path.is_file():
            raise LmpipeError(f"missing tokenizer file {path}")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the library's messages are long; the type says enough
            raise LmpipeError(f"{path}: not a Hugging Face tokenizer file ({type(exc).__name__})") from exc
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise LmpipeError(f"{path}: no {pad_token} token; expected the encoder's tokenizer")
        # Padding and truncation are this class's business (per batch), whatever the file says.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        return cls(tokenizer, pad_id, str(path))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def save(self, path: str | os.PathLike) -> None:
        self.tokenizer.save(str(path))

    def encode(
        self, texts: list[str], max_length: int, too_long: str, where: str = "text"
    ) -> list[np.ndarray]:
        """Token ids of each text, at most `max_length` (specials included); a longer text is cut to fit with
        one warning counting them (too_long="truncate") or refused (too_long="refuse")."""
        self.tokenizer.enable_truncation(max_length)
        try:
            encodings = self.tokenizer.encode_batch(texts)
        finally:
            self.tokenizer.no_truncation()
        cut = [i for i, e in enumerate(encodings) if e.overflowing]
        if cut and too_long == "refuse":
            raise LmpipeError(
                f"{where} {cut[0]}: {texts[cut[0]][:40]!r}... is longer than encoder.max_length={max_length} "
                f"tokens ({len(cut)} such texts); raise max_length or set encoder.too_long=truncate"
            )
        if cut:
            warnings.warn(
                f"{len(cut)} of {len(texts)} texts ({where}) longer than {max_length} tokens were truncated",
                stacklevel=2,
            )
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]
