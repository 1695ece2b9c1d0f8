"""Every on-disk name and reserved token of lmpipe, defined once (nothing here imports torch).

A stage writes a directory; later stages, the registry and the server read it back. They agree on what is
inside only through the names below, so a rename happens here and nowhere else.
"""

# --- Special tokens: reserved at ids 0..5, in this order, in every tokenizer ---------------------------------
EOT = "<|endoftext|>"
"""Separates documents in the token stream (and ends a generated text)."""
PAD = "<|pad|>"
"""Fills batches of unequal length; never a prediction target."""
SYSTEM = "<|system|>"
"""Opens the system message of a chat."""
USER = "<|user|>"
"""Opens a user turn of a chat."""
ASSISTANT = "<|assistant|>"
"""Opens an assistant turn of a chat."""
END = "<|end|>"
"""Ends one chat turn."""
SPECIAL_TOKENS = (EOT, PAD, SYSTEM, USER, ASSISTANT, END)
"""Reserved at ids 0..5 in this order, in every tokenizer."""
UNK = "<|unk|>"
"""Char tokenizer only: stands for a character not seen in training (id 6)."""
MASK = "<|mask|>"
"""Encoder tokenizers only (encoder_mlm): the masked-LM mask token, appended after the corpus vocabulary."""

IGNORE_INDEX = -100
"""Label of a position the loss skips (PyTorch's cross-entropy default): prompts, padding."""

# --- A tokens directory (the tokenize stage) and the tokenizer files every model directory carries -------------
TOKENIZER_FILE = "tokenizer.json"
"""The Hugging Face tokenizer, in a tokens directory and in every model and ONNX directory."""
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
"""Beside the tokenizer: the chat template and the special-token roles (see lmpipe.chat)."""
META_FILE = "meta.json"
"""Token shard metadata: dtype, vocabulary size, tokenizer hash, per-split counts."""
SHARD_SUFFIX = ".bin"
"""`<split>.bin`: the split's token ids back to back, raw numpy in the dtype of META_FILE."""

# --- A model directory (pretrain, sft, distill) -------------------------------------------------------------
MODEL_FILE = "model.pt"
"""The GPT's weights and config (lmpipe.model.save_checkpoint)."""
HEADS_FILE = "heads.pt"
"""sft.method=head: the classification heads and their label sets."""
SAMPLES_FILE = "samples.txt"
"""Generated samples written at the end of a training stage (and by evaluate)."""

# --- An encoder directory (encoder_finetune) -----------------------------------------------------------------
ENCODER_FILE = "encoder.pt"
"""The encoder's config, weights and extra (lmpipe.model.save_checkpoint); beside it HEADS_FILE, the
encoder's own TOKENIZER_FILE and SAMPLES_FILE (lmpipe.encoder.classifier)."""
ENCODER_ONNX_DIR = "onnx"
"""Inside an encoder classifier directory: its ONNX export (ONNX_FILE, ONNX_CONFIG_FILE, TOKENIZER_FILE)."""
SKIPPED_FILE = "skipped.json"
"""The only file of a declared output directory that a stage's config left untrained (a comparison turned off,
e.g. encoder.also_scratch=false): {"stage", "reason"}, so DVC finds its output and readers a clear reason."""

# --- An ONNX directory (export, quantize) ---------------------------------------------------------------------
ONNX_FILE = "model.onnx"
"""The graph inside an export directory."""
ONNX_CONFIG_FILE = "config.json"
"""What a runtime needs besides the graph: model shape, io names, special-token ids."""
CLASSIFIER_INT8_DIR = "classifier-int8"
"""Under paths.onnx (stage quantize): the int8 copy of the encoder classifier's ENCODER_ONNX_DIR."""

# --- An instructions directory (the instructions stage) -------------------------------------------------------
INSTRUCTION_SPLITS = ("train", "val", "test")
"""`<split>.jsonl` of instruction examples."""
LABELS_FILE = "labels.json"
"""Label set of each label task."""
INSTRUCTION_STATS_FILE = "stats.json"
"""Example counts per task and split."""
MC_FILE = "mc_test.jsonl"
"""Multiple-choice benchmark questions in the MMLU format."""


# --- A preferences directory (the preferences stage) and the reward model --------------------------------------
PREFERENCE_STATS_FILE = "stats.json"
"""Pair counts per split, task and kind of negative."""
REWARD_HEAD_FILE = "reward_head.pt"
"""Beside model.pt in a reward model directory: the scalar head on the backbone's last hidden state."""


# --- Tracking ----------------------------------------------------------------------------------------------------
DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"
"""The MLflow store every stage, the registry and `lmpipe generate/serve` use unless MLFLOW_TRACKING_URI or
logger.tracking_uri says otherwise (relative to the repository root)."""


def split_file(split: str) -> str:
    """`<split>.jsonl`: the instruction examples of one split."""
    return f"{split}.jsonl"


def shard_file(split: str) -> str:
    """`<split>.bin`: the token shard of one split."""
    return f"{split}{SHARD_SUFFIX}"
