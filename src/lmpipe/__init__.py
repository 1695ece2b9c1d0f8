"""lmpipe: raw text to a served language model, one reproducible pipeline stage at a time."""

__version__ = "0.1.0"
