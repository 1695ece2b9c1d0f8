"""Stage `preferences`: {prompt, chosen, rejected} pairs for the reward model and DPO, from the label tasks of
the training chapters only; the rejected response is a random wrong label or the SFT model's own wrong sample
(on-policy), mixed by `preferences.on_policy_fraction`, each pair recording its kind. A user's own preference
JSONL (`preferences.jsonl`) is accepted instead.

Outs: <paths.preferences>/{train,val,test}.jsonl, stats.json; <paths.metrics>/preferences.json.
"""

from pathlib import Path

from lmpipe import atomic, config, tracking
from lmpipe.stage import run_stage

SECTIONS = ("seed", "paths", "preferences", "logger")


def main(cfg):
    from lmpipe.chat import load_chat_template
    from lmpipe.data.instructions import read_examples, read_label_sets
    from lmpipe.data.preferences import (
        build_pairs,
        check_lengths,
        drop_too_long,
        load_user_pairs,
        pair_stats,
        write_pairs,
    )
    from lmpipe.formats import MODEL_FILE, TOKENIZER_FILE
    from lmpipe.model import load_model
    from lmpipe.tokenizer import load_tokenizer
    from lmpipe.training.policy import make_sampler

    pcfg = config.build(cfg.preferences)
    sft_dir = Path(cfg.paths.sft)
    model, _ = load_model(sft_dir / MODEL_FILE)
    tokenizer = load_tokenizer(sft_dir / TOKENIZER_FILE)
    template = load_chat_template(sft_dir)
    context = model.config.block_size
    with tracking.stage_run("preferences", cfg, SECTIONS):
        if pcfg.jsonl:
            pairs, extra = load_user_pairs(pcfg.jsonl, cfg.seed, pcfg.val_fraction, pcfg.test_fraction)
            for part in pairs.values():
                check_lengths(part, tokenizer, template, context, pcfg.jsonl)
            skipped = dict.fromkeys(pairs, 0)
        else:
            data_dir = Path(cfg.paths.instructions)
            sampler = make_sampler(
                model, tokenizer, template, pcfg.sample_tokens, pcfg.sample_temperature, cfg.seed
            )
            built, extra = build_pairs(
                read_examples(data_dir, "train"), read_label_sets(data_dir), pcfg, cfg.seed, sampler
            )
            pairs = {
                split: drop_too_long(part, tokenizer, template, context) for split, part in built.items()
            }
            skipped = {split: len(built[split]) - len(pairs[split]) for split in built}
        stats = pair_stats(pairs, {**extra, "skipped_too_long": skipped})
        write_pairs(pairs, stats, cfg.paths.preferences)
        atomic.write_json(Path(cfg.paths.metrics) / "preferences.json", stats)
        tracking.log_metrics(stats)
        print(f"preferences: {stats['total']} pairs -> {cfg.paths.preferences}")


if __name__ == "__main__":
    raise SystemExit(run_stage("preferences", SECTIONS, main))
