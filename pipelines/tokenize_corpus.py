"""Stage `tokenize`: train the tokenizer on the train split, then encode every split to a flat token file.
(The file is not called tokenize.py: that would shadow the standard library's `tokenize` for every script here.)

The corpus is streamed by record batches, never loaded whole: the tokenizer trains from an iterator over the
train split (or an even sample of it, tokenizer.train_sample_chars), and batches of documents are encoded by
`data.workers` processes (data.engine: local or dask) and appended to their split's file as they come back.

Outs: <paths.tokens>/{train,val,test}.bin (numpy memmaps), meta.json (counts, dtype, tokenizer hash),
tokenizer.json (the trained tokenizer, special tokens reserved for end-of-text and chat turns) and
tokenizer_config.json (the chat template, which travels with the tokenizer into every model directory).
"""

import os
from functools import partial
from pathlib import Path

from lmpipe import config, tracking
from lmpipe.stage import run_stage

SECTIONS = ("paths", "data", "tokenizer", "logger")


def main(cfg):
    from lmpipe.data.corpus import CORPUS_FILE
    from lmpipe.data.documents import iter_documents, sample_documents, split_chars, split_documents
    from lmpipe.data.engine import map_ordered, resolve_workers
    from lmpipe.data.splits import SPLITS
    from lmpipe.tokenizer import train_tokenizer, write_token_shards

    data = config.build(cfg.data)
    tcfg = config.build(cfg.tokenizer)
    corpus = Path(cfg.paths.prepared) / CORPUS_FILE
    with tracking.stage_run("tokenize", cfg, SECTIONS):
        texts = split_documents(corpus, "train")
        if tcfg.train_sample_chars:
            texts = sample_documents(texts, split_chars(corpus, "train"), tcfg.train_sample_chars)
        tokenizer = train_tokenizer(texts, tcfg)
        workers = resolve_workers(data.workers)
        mapper = partial(map_ordered, engine=data.engine, workers=workers, address=data.engine_address)
        # Several worker processes: one Rust thread each (set before they fork, as HF tokenizers asks).
        single = data.engine == "local" and workers <= 1
        if not single:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        meta = write_token_shards(
            Path(cfg.paths.tokens), SPLITS, iter_documents(corpus), tokenizer, mapper, rust_threads=single
        )
        tracking.log_metrics(meta)
        print(f"tokenize: vocab {meta['vocab_size']} -> {cfg.paths.tokens}")


if __name__ == "__main__":
    raise SystemExit(run_stage("tokenize", SECTIONS, main))
