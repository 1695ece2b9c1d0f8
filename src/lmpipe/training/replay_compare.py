"""`make compare-replay`'s table: SFT fine-tuned with several `sft.replay` shares, against the pretrained model
and against SFT without replay, from one `evaluate` run over all of them, with the issue's target checked.

Target of a replay share (the measured default must meet it): test perplexity at most MAX_PPL_RATIO x the
pretrained model's, while testament accuracy and book macro-F1 fall at most MAX_DROP_POINTS points below
SFT without replay (replay 0). Among the shares that meet it, the one with the lowest test perplexity is
recommended (the least forgetting).

python -m lmpipe.training.replay_compare DIR PRETRAINED REPLAY=SFT_DIR...: reads DIR/evaluate.json (and
DIR/<REPLAY>/sft.json, when there, for the training time) and writes DIR/compare.md and DIR/compare.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lmpipe import atomic
from lmpipe.errors import LmpipeError, require_file
from lmpipe.evaluation.alignment import row_of_directory, summary
from lmpipe.evaluation.tasks import variant_table

MAX_PPL_RATIO = 1.25
"""Test perplexity of SFT with replay, at most this times the pretrained model's."""
MAX_DROP_POINTS = 2.0
"""Testament accuracy and book macro-F1 of SFT with replay, at most this many points (x100) below replay 0's."""

COLUMNS = [
    ("test_ppl", "test ppl"),
    ("ppl_ratio_vs_pretrained", "ppl / pretrained"),
    ("testament_accuracy", "testament acc"),
    ("testament_accuracy_change_points", "testament acc - replay 0 (points)"),
    ("book_f1_macro", "book F1 macro"),
    ("book_f1_macro_change_points", "book F1 macro - replay 0 (points)"),
    ("train_seconds", "sft train s"),
    ("meets_target", "meets target"),
]


def _row(evaluation: dict, directory: str) -> dict:
    row = row_of_directory(evaluation, directory)
    if row is None:
        raise LmpipeError(
            f"evaluate.json has no row for {directory} (evaluated: "
            f"{', '.join(str(r.get('directory')) for r in evaluation['variants'].values())}); add it to "
            "evaluate.variants"
        )
    values = summary(evaluation, row)
    for key in ("testament_accuracy", "book_f1_macro"):
        if values[key] is None:
            raise LmpipeError(f"evaluate.json has no {key} for {directory}: expected evaluate.tasks=true")
    return values


def compare(
    evaluation: dict, pretrained: str, runs: dict[str, str], train_seconds: dict | None = None
) -> dict:
    """The comparison of the SFT runs `runs` (replay share as written, e.g. "0.125" -> model directory; share 0
    is the baseline); `train_seconds` (share -> seconds) adds each run's SFT training time."""
    shares = {text: _share(text) for text in runs}
    baseline = next((text for text, share in shares.items() if share == 0), None)
    if baseline is None:
        raise LmpipeError(
            f"replay shares {list(runs)}: expected 0 among them (SFT without replay is the baseline)"
        )
    base = _row(evaluation, pretrained)
    rows = {text: _row(evaluation, runs[text]) for text in sorted(runs, key=shares.get)}
    for text, row in rows.items():
        row["directory"] = runs[text]
        row["ppl_ratio_vs_pretrained"] = row["test_ppl"] / base["test_ppl"]
        for key in ("testament_accuracy", "book_f1_macro"):
            row[f"{key}_change_points"] = 100 * (row[key] - rows[baseline][key])
        row["train_seconds"] = (train_seconds or {}).get(text)
        row["meets_target"] = row["ppl_ratio_vs_pretrained"] <= MAX_PPL_RATIO and all(
            row[f"{key}_change_points"] >= -MAX_DROP_POINTS for key in ("testament_accuracy", "book_f1_macro")
        )
    meeting = [text for text, row in rows.items() if row["meets_target"]]
    best = min(meeting, key=lambda text: (rows[text]["test_ppl"], shares[text])) if meeting else None
    return {
        "pretrained": {"directory": pretrained, **base},
        "replay": rows,
        "target": {"max_ppl_ratio_vs_pretrained": MAX_PPL_RATIO, "max_drop_points": MAX_DROP_POINTS},
        "recommended": None if best is None else shares[best],
    }


def report(result: dict) -> str:
    rows = {f"replay {share}": row for share, row in result["replay"].items()}
    pretrained = result["pretrained"]
    text = "# SFT with pretraining replay (`sft.replay`)\n\n" + variant_table(rows, COLUMNS, first="sft")
    text += (
        f"\nPretrained model ({pretrained['directory']}): test perplexity {pretrained['test_ppl']:.2f}. Target: "
        f"test perplexity at most {MAX_PPL_RATIO}x the pretrained model's, testament accuracy and book macro-F1 "
        f"at most {MAX_DROP_POINTS:g} points below replay 0's. "
    )
    if result["recommended"] is None:
        text += 'No share meets it: try larger ones (make compare-replay REPLAYS="0 0.375 0.5").\n'
    else:
        text += (
            f"Recommended default: sft.replay={result['recommended']} (meets it with the lowest test "
            "perplexity).\n"
        )
    return text


def _share(text: str) -> float:
    try:
        share = float(text)
    except ValueError:
        share = -1.0
    if not 0 <= share < 1:
        raise LmpipeError(f"replay share {text!r}: expected a number in [0, 1) (sft.replay)")
    return share


def main(argv: list[str]) -> int:
    try:
        if len(argv) < 3 or not all("=" in arg for arg in argv[2:]):
            raise LmpipeError(f"usage: python -m {__spec__.name} DIR PRETRAINED_DIR REPLAY=SFT_DIR...")
        directory, pretrained = Path(argv[0]), argv[1]
        runs = dict(arg.split("=", 1) for arg in argv[2:])
        evaluation = json.loads(
            require_file(directory / "evaluate.json", produced_by="evaluate").read_text(encoding="utf-8")
        )
        seconds = {
            share: json.loads(path.read_text(encoding="utf-8")).get("train_seconds")
            for share in runs
            if (path := directory / share / "sft.json").is_file()
        }
        result = compare(evaluation, pretrained, runs, seconds)
    except LmpipeError as exc:
        print(f"compare-replay: error: {exc}", file=sys.stderr)
        return 2
    text = report(result)
    atomic.write_json(directory / "compare.json", result)
    atomic.write_text(directory / "compare.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
