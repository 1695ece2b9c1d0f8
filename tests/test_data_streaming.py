import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from lmpipe.data import sources
from lmpipe.data.corpus import DataConfig, corpus_stats, iter_corpus, prepare_corpus, read_corpus
from lmpipe.data.sources import read_lines
from lmpipe.data.streaming import prepare_to_file
from lmpipe.errors import LmpipeError

REPO = Path(__file__).resolve().parents[1]


def streamed(cfg: DataConfig, tmp_path: Path, seed: int = 0) -> tuple[pd.DataFrame, dict]:
    path = tmp_path / "out" / "corpus.parquet"
    path.parent.mkdir(exist_ok=True)
    stats = prepare_to_file(cfg, seed, path)
    assert not path.with_name(path.name + ".unsplit").exists()
    return read_corpus(path), stats


def assert_same_as_in_memory(cfg: DataConfig, tmp_path: Path, seed: int = 0) -> pd.DataFrame:
    expected = prepare_corpus(cfg, seed)
    got, stats = streamed(cfg, tmp_path, seed)
    pd.testing.assert_frame_equal(got, expected)
    assert stats == corpus_stats(expected)
    return got


def write_text_corpus(root: Path) -> None:
    paragraphs = [f"Paragraph number {i}.\nsecond line  {i % 7}" for i in range(90)]
    text = "\ufeff" + "\n\n".join(paragraphs[:40] + ["\u200b", "  \n", paragraphs[3]])
    text += "\r\n\r\n\r\n" + "\r\n\r\n".join(paragraphs[40:]) + "\n\n\n\n"
    (root / "book.txt").write_bytes(text.encode())
    records = [{"text": t} for t in ["x", "x", "  y  ", "Paragraph number 3.\nsecond line  3"]]
    records += [{"text": f"record {i}", "id": i} for i in range(30)] + [{"text": "\u200b"}]
    (root / "more.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + "\n", encoding="utf-8")


@pytest.mark.parametrize("dedup", ["none", "row", "document"])
@pytest.mark.parametrize("collapse", [False, True])
def test_text_corpus_streams_to_the_in_memory_result(tmp_path, monkeypatch, dedup, collapse):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sources, "_TXT_CHUNK", 40)  # cut .txt files in many buffers
    write_text_corpus(tmp_path)
    cfg = DataConfig(
        source="text",
        paths=["*.txt", "*.jsonl"],
        txt_paragraphs_per_doc=3,
        dedup=dedup,
        collapse_whitespace=collapse,
        batch_docs=4,
        workers=1,
    )
    got = assert_same_as_in_memory(cfg, tmp_path, seed=3)
    assert set(got["split"]) == {"train", "val", "test"}


@pytest.mark.parametrize("dedup", ["row", "document"])
def test_kjv_and_pydoc_stream_to_the_in_memory_result(tmp_path, dedup):
    kjv = DataConfig(source="kjv", books=["Ruth", "Jonah", "Jude"], dedup=dedup, batch_docs=2, workers=1)
    assert_same_as_in_memory(kjv, tmp_path)
    pydoc = DataConfig(source="pydoc", max_docs=40, dedup=dedup, batch_docs=7, workers=1)
    assert_same_as_in_memory(pydoc, tmp_path)


def test_iter_corpus_reads_batches_and_columns(tmp_path):
    path = tmp_path / "corpus.parquet"
    prepare_to_file(DataConfig(source="kjv", books=["Ruth"], workers=1), 0, path)
    parts = list(iter_corpus(path, columns=["doc_id", "text"], batch_rows=10))
    assert all(len(p) <= 10 for p in parts) and len(parts) > 5
    pd.testing.assert_frame_equal(pd.concat(parts, ignore_index=True), read_corpus(path)[["doc_id", "text"]])


def test_truncated_corpus_is_a_one_line_error(tmp_path):
    path = tmp_path / "corpus.parquet"
    prepare_to_file(DataConfig(source="kjv", books=["Ruth"], workers=1), 0, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(LmpipeError, match=r"corpus\.parquet: .*re-run prepare") as e:
        list(iter_corpus(path))
    assert "\n" not in str(e.value)


def test_a_line_over_the_limit_is_an_error_naming_file_and_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    long = json.dumps({"text": "a" * 5000})
    (tmp_path / "c.jsonl").write_text(f'{{"text": "ok"}}\n{long}\n', encoding="utf-8")
    cfg = DataConfig(source="text", paths=["c.jsonl"], max_record_bytes=1000, workers=1)
    with pytest.raises(LmpipeError, match=r"^c\.jsonl:2: line longer than data\.max_record_bytes=1000 bytes"):
        streamed(cfg, tmp_path)
    # At the limit is fine.
    assert len(list(read_lines(tmp_path / "c.jsonl", len(long) + 1))) == 3


def test_a_paragraph_over_the_limit_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_TXT_CHUNK", 10)
    (tmp_path / "c.txt").write_text("word\n" * 500, encoding="utf-8")
    docs = sources.text_documents([str(tmp_path / "c.txt")], max_record_bytes=100)
    with pytest.raises(LmpipeError, match=r"c\.txt:\d+: paragraph longer than data\.max_record_bytes=100"):
        list(docs)


def test_a_file_that_changes_while_read_is_an_error(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": f"r{i}"}) + "\n" for i in range(10)), encoding="utf-8")
    lines = read_lines(path)
    next(lines)
    with path.open("a", encoding="utf-8") as f:
        f.write('{"text": "late"}\n')
    with pytest.raises(LmpipeError, match=r"c\.jsonl: changed while it was read"):
        list(lines)


def test_a_glob_matching_nothing_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LmpipeError, match=r"data\.paths: 'nothing/\*\.jsonl' matches no files"):
        streamed(DataConfig(source="text", paths=["nothing/*.jsonl"], workers=1), tmp_path)


def test_duplicate_ids_across_batches_are_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.jsonl").write_text(
        "".join(json.dumps({"text": f"r{i}", "id": i % 5}) + "\n" for i in range(8)), encoding="utf-8"
    )
    cfg = DataConfig(source="text", paths=["c.jsonl"], batch_docs=2, workers=1)
    with pytest.raises(LmpipeError, match=r"c\.jsonl: duplicate document id '0'"):
        streamed(cfg, tmp_path)


def test_near_dedup_drops_near_copies_keeping_the_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = [" ".join(f"w{d}_{i}" for i in range(200)) for d in range(6)]
    near = [t.replace(f"w{d}_17 ", "CHANGED ") for d, t in enumerate(base[:3])]  # one word in 200 differs
    records = [{"text": t} for t in base + near]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    cfg = DataConfig(source="text", paths=["c.jsonl"], near_dedup=True, batch_docs=4, workers=1)
    got, stats = streamed(cfg, tmp_path)
    assert got["text"].tolist() == base
    assert stats["removed"]["near_duplicates_removed"] == 3
    off, _ = streamed(DataConfig(source="text", paths=["c.jsonl"], workers=1), tmp_path)
    assert len(off) == 9


@pytest.mark.slow
def test_prepare_stage_bad_input_keeps_previous_outputs(tmp_path):
    (tmp_path / "c.jsonl").write_text(
        "".join(json.dumps({"text": f"record number {i} " * 3}) + "\n" for i in range(300)), encoding="utf-8"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    args = [
        sys.executable,
        str(REPO / "pipelines" / "prepare.py"),
        "data=text",
        f"data.paths=[{tmp_path}/c.jsonl]",
        f"paths.prepared={tmp_path}/prepared",
        f"paths.metrics={tmp_path}/metrics",
        f"logger.tracking_uri=sqlite:///{tmp_path}/mlruns.db",
        f"logger.artifact_location={tmp_path}/mlartifacts",
    ]
    good = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    before = (tmp_path / "prepared" / "corpus.parquet").read_bytes()
    with (tmp_path / "c.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "z" * 3000}) + "\n")
    bad = subprocess.run(
        [*args, "data.max_record_bytes=1000"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert bad.returncode != 0
    assert "c.jsonl:301: line longer than data.max_record_bytes=1000" in bad.stderr
    assert len([line for line in bad.stderr.splitlines() if "error" in line.lower()]) == 1
    assert (tmp_path / "prepared" / "corpus.parquet").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "prepared").iterdir()) == ["corpus.parquet", "stats.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prepared")]


def test_batches_go_through_map_ordered_with_the_engine_config(tmp_path, monkeypatch):
    from lmpipe.data import engine

    calls = []

    def spy(fn, items, **kwargs):
        calls.append(kwargs)
        return map(fn, items)

    monkeypatch.setattr(engine, "map_ordered", spy)
    monkeypatch.setattr(os, "cpu_count", lambda: 7)
    for workers, expected in [(3, 3), (0, 7)]:
        cfg = DataConfig(
            source="kjv", books=["Ruth"], workers=workers, engine="dask", engine_address="tcp://x:8786"
        )
        streamed(cfg, tmp_path)
        assert calls.pop() == {"engine": "dask", "workers": expected, "address": "tcp://x:8786"}


def test_two_worker_processes_give_the_in_memory_result(tmp_path):
    cfg = DataConfig(source="kjv", books=["Ruth", "Jonah", "Jude"], dedup="row", batch_docs=2, workers=2)
    assert_same_as_in_memory(cfg, tmp_path)
