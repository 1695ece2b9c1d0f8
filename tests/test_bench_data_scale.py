"""Tests for bench/data_scale.py: one small corpus (enough documents for the text validation) through prepare, tokenize and instructions."""

import json
import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest

from lmpipe.errors import LmpipeError

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "data_scale.py"


def load_script():
    return SimpleNamespace(**runpy.run_path(str(SCRIPT)))


def test_synthetic_corpus_repeats_chapters_with_unique_first_lines(tmp_path):
    bench = load_script()
    path = tmp_path / "c.jsonl"
    written = bench.write_corpus(path, 5_000_000)  # more than one copy of the KJV (~4.3 MB)
    records = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
    assert written >= 5_000_000 and written == sum(len(r.encode()) for r in records)
    assert len(set(records)) == len(records)  # dedup: document keeps every copy
    assert records[0].split("\n", 1)[1] == records[1189].split("\n", 1)[1]  # 1,189 chapters, then copy 1


@pytest.mark.slow
def test_tiny_run_reports_every_stage(tmp_path):
    bench = load_script()
    out = tmp_path / "results" / "data_scale.json"
    results = bench.main(["--sizes-mb", "1.5", "--out", str(out), "--workdir", str(tmp_path)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    (run,) = results["runs"]
    assert run["size_mb"] >= 1.5
    assert set(run["stages"]) == {"prepare", "tokenize", "instructions"}
    for numbers in run["stages"].values():
        assert set(numbers) == {"seconds", "mb_per_s", "peak_rss_mb"}
        assert all(value > 0 for value in numbers.values())
    encode = run["encode"]
    for encoder in ("huggingface", "tiktoken"):
        for workers in (1, 2):
            numbers = encode[f"{encoder}_{workers}_workers"]
            assert numbers["same_ids"] is True and numbers["mb_per_s"] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["results"]  # corpora and outputs removed


def test_bad_size_is_an_error(tmp_path):
    with pytest.raises(LmpipeError, match="--sizes-mb"):
        load_script().main(["--sizes-mb", "0", "--out", str(tmp_path / "x.json")])
