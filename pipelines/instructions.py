"""Stage `instructions`: instruction/response pairs for fine-tuning and a multiple-choice benchmark, built
from the prepared corpus with the same held-out documents (no val/test chapter is ever trained on).

Outs: <paths.instructions>/{train,val,test}.jsonl, labels.json, stats.json, mc_test.jsonl (MMLU format).
"""

from pathlib import Path

from lmpipe import config, tracking
from lmpipe.formats import MC_FILE
from lmpipe.stage import run_stage

SECTIONS = ("seed", "paths", "instructions", "logger")


def main(cfg):
    from lmpipe import atomic
    from lmpipe.data.corpus import CORPUS_FILE, sample_corpus
    from lmpipe.data.instructions import (
        build_examples,
        build_mc,
        read_mc_jsonl,
        write_examples,
        write_mc_jsonl,
    )

    icfg = config.build(cfg.instructions)
    out = Path(cfg.paths.instructions)
    with tracking.stage_run("instructions", cfg, SECTIONS):
        corpus = sample_corpus(Path(cfg.paths.prepared) / CORPUS_FILE, icfg.max_corpus_chars, cfg.seed)
        examples = build_examples(corpus, icfg, cfg.seed)
        if icfg.mc_jsonl:
            items = [
                {"question": i.question, "choices": i.choices, "answer": i.answer_index, "subject": i.subject}
                for i in read_mc_jsonl(icfg.mc_jsonl)
            ]
        else:
            items = build_mc(corpus, icfg, cfg.seed, split="test")
        with atomic.atomic_path(out) as tmp:
            stats = write_examples(examples, tmp)
            write_mc_jsonl(items, tmp / MC_FILE)
        tracking.log_metrics({**stats["total"], "mc_questions": len(items)}, prefix="examples")
        print(f"instructions: {stats['total']} examples, {len(items)} MC questions -> {out}")


if __name__ == "__main__":
    raise SystemExit(run_stage("instructions", SECTIONS, main))
