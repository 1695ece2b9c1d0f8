"""Stage `tokenize`: train the tokenizer on the train split, then encode every split to a flat token file.
(The file is not called tokenize.py: that would shadow the standard library's `tokenize` for every script here.)

Outs: <paths.tokens>/{train,val,test}.bin (numpy memmaps), meta.json (counts, dtype, tokenizer hash),
tokenizer.json (the trained tokenizer, special tokens reserved for end-of-text and chat turns) and
tokenizer_config.json (the chat template, which travels with the tokenizer into every model directory).
"""

from pathlib import Path

from lmpipe import config, tracking
from lmpipe.stage import run_stage

SECTIONS = ("paths", "tokenizer", "logger")


def main(cfg):
    from lmpipe.data.corpus import CORPUS_FILE, documents_by_split, read_corpus
    from lmpipe.tokenizer import train_tokenizer, write_shards

    with tracking.stage_run("tokenize", cfg, SECTIONS):
        corpus = read_corpus(Path(cfg.paths.prepared) / CORPUS_FILE)
        docs = documents_by_split(corpus)
        tokenizer = train_tokenizer(docs["train"], config.build(cfg.tokenizer))
        meta = write_shards(Path(cfg.paths.tokens), docs, tokenizer)
        tracking.log_metrics(meta)
        print(f"tokenize: vocab {meta['vocab_size']} -> {cfg.paths.tokens}")


if __name__ == "__main__":
    raise SystemExit(run_stage("tokenize", SECTIONS, main))
