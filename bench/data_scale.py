"""Benchmark: the data stages (prepare, tokenize, instructions) on synthetic corpora of increasing size.

Each corpus is a JSONL file of KJV chapters (the embedded corpus) repeated until it reaches the size asked for;
every copy of a chapter starts with its own first line ("copy N of <chapter>"), so `dedup: document` keeps them
all. Each stage script runs as a subprocess with config overrides that put every output (and the MLflow store)
in a temporary folder; per stage the JSON reports wall seconds, MB/s of corpus text and the peak memory of the
stage's process tree (psutil: the sum of its processes' PSS, polled every 50 ms; without psutil, the children's maximum RSS from getrusage).

    python bench/data_scale.py [--sizes-mb 4] [--large] [--out bench/results/data_scale.json]

`--large` measures 300 MB and 3,000 MB (3 GB needs ~6 GB of disk and the better part of an hour on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lmpipe import atomic
from lmpipe.errors import LmpipeError, run_main

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "data_scale.json"
QUICK_SIZES_MB = (4.0,)
LARGE_SIZES_MB = (300.0, 3000.0)
STAGES = ("prepare", "tokenize", "instructions")
SCRIPTS = {"prepare": "prepare.py", "tokenize": "tokenize_corpus.py", "instructions": "instructions.py"}
POLL_SECONDS = 0.05


def kjv_chapters() -> list[tuple[str, str]]:
    """(chapter id, text) of every KJV chapter, verses one per line."""
    from lmpipe.data.sources import load_kjv

    df = load_kjv()
    return [(doc_id, "\n".join(rows["text"])) for doc_id, rows in df.groupby("doc_id", sort=False)]


def write_corpus(path: Path, size_bytes: int) -> int:
    """Write a JSONL corpus of at least `size_bytes` bytes of text; returns the bytes of text written."""
    chapters = kjv_chapters()
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        copy = 0
        while written < size_bytes:
            for chapter, text in chapters:
                doc = f"copy {copy} of {chapter}\n{text}"
                f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
                written += len(doc.encode("utf-8"))
                if written >= size_bytes:
                    break
            copy += 1
    return written


def run_measured(cmd: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Run `cmd`; return (seconds, peak RSS in bytes of its process tree). A failure raises LmpipeError."""
    try:
        import psutil
    except ImportError:
        psutil = None
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peak = 0
    if psutil is not None:
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            total = 0
            try:
                # PSS: forked workers share their parent's pages, which an RSS sum would count twice.
                for p in [root, *root.children(recursive=True)]:
                    total += p.memory_full_info().pss
            except psutil.Error:
                pass  # a process ended between the listing and the reading
            peak = max(peak, total)
            time.sleep(POLL_SECONDS)
    output = proc.communicate()[0]
    seconds = time.perf_counter() - start
    if psutil is None:
        import resource

        # The largest child so far, in KiB on Linux: a bound per process, not the tree's sum.
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    if proc.returncode != 0:
        last = output.strip().splitlines()[-1] if output.strip() else "(no output)"
        raise LmpipeError(f"{' '.join(cmd[1:3])}: exit {proc.returncode}: {last}")
    return seconds, peak


def measure(size_mb: float, work: Path, extra: list[str]) -> dict:
    """Make one corpus of `size_mb` MB and run every stage on it."""
    work.mkdir(parents=True)
    corpus = work / "corpus.jsonl"
    text_bytes = write_corpus(corpus, int(size_mb * 1e6))
    # The built multiple-choice benchmark asks for KJV books; a text corpus brings its own (one question).
    mc = work / "mc.jsonl"
    mc.write_text(
        json.dumps({"question": "Is this a benchmark?", "choices": ["yes", "no"], "answer": 0}) + "\n"
    )
    overrides = [
        "data=text",
        f"data.paths=[{corpus}]",
        f"paths.prepared={work / 'prepared'}",
        f"paths.tokens={work / 'tokens'}",
        f"paths.instructions={work / 'instructions'}",
        f"paths.metrics={work / 'metrics'}",
        f"logger.tracking_uri=sqlite:///{work / 'mlruns.db'}",
        f"logger.artifact_location={work / 'mlartifacts'}",
        f"instructions.mc_jsonl={mc}",
        "instructions.tasks=[continue]",  # the label tasks need the KJV's books
        *extra,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_EXP"))}
    stages = {}
    for stage in STAGES:
        # Each stage rejects overrides of sections it does not read; pass only its own.
        own = [o for o in overrides if _section(o) in _sections(stage)]
        seconds, peak = run_measured([sys.executable, str(ROOT / "pipelines" / SCRIPTS[stage]), *own], env)
        stages[stage] = {
            "seconds": round(seconds, 3),
            "mb_per_s": round(text_bytes / 1e6 / seconds, 3),
            "peak_rss_mb": round(peak / 1e6, 1),
        }
        print(
            f"data_scale: {size_mb:g} MB {stage}: {seconds:.1f} s, {peak / 1e6:.0f} MB RSS", file=sys.stderr
        )
    return {"size_mb": round(text_bytes / 1e6, 3), "stages": stages, "encode": measure_encoding(work)}


def measure_encoding(work: Path) -> dict:
    """Encoding alone (tokenizer training apart): the train split re-encoded with the tokenizer the stage
    trained, by Hugging Face's encoder and by its exact tiktoken twin (lmpipe.fast_bpe), on 1 and 2 worker
    processes; MB/s of train text and whether train.bin came out byte for byte as the stage wrote it."""
    import hashlib
    from functools import partial

    from lmpipe.data.corpus import CORPUS_FILE
    from lmpipe.data.documents import split_documents
    from lmpipe.data.engine import map_ordered
    from lmpipe.formats import TOKENIZER_FILE, shard_file
    from lmpipe.tokenizer import load_tokenizer, read_meta, write_token_shards

    tokens = work / "tokens"
    tok = load_tokenizer(tokens / TOKENIZER_FILE)
    train_bytes = read_meta(tokens)["splits"]["train"]["n_bytes"]
    expected = hashlib.sha256((tokens / shard_file("train")).read_bytes()).hexdigest()
    results = {}
    for encoder, fast in (("huggingface", False), ("tiktoken", True)):
        for workers in (1, 2):
            out = work / f"encode-{encoder}-{workers}"
            docs = (("train", text) for text in split_documents(work / "prepared" / CORPUS_FILE, "train"))
            mapper = partial(map_ordered, engine="local", workers=workers)
            start = time.perf_counter()
            write_token_shards(out, ["train"], docs, tok, mapper, rust_threads=False, fast_bpe=fast)
            seconds = time.perf_counter() - start
            results[f"{encoder}_{workers}_workers"] = {
                "seconds": round(seconds, 3),
                "mb_per_s": round(train_bytes / 1e6 / seconds, 3),
                "same_ids": hashlib.sha256((out / shard_file("train")).read_bytes()).hexdigest() == expected,
            }
    results["tiktoken_over_huggingface_2_workers"] = round(
        results["tiktoken_2_workers"]["mb_per_s"] / results["huggingface_2_workers"]["mb_per_s"], 2
    )
    print(f"data_scale: encode {json.dumps(results)}", file=sys.stderr)
    return results


def _section(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0].split(".", 1)[0]


def _sections(stage: str) -> tuple[str, ...]:
    import runpy

    return runpy.run_path(str(ROOT / "pipelines" / SCRIPTS[stage]))["SECTIONS"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes-mb", type=float, nargs="+", default=list(QUICK_SIZES_MB), help="corpus sizes"
    )
    parser.add_argument("--large", action="store_true", help=f"sizes {LARGE_SIZES_MB} MB instead")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--workdir", type=Path, default=None, help="where corpora go (default: a temp dir)")
    parser.add_argument(
        "--overrides",
        nargs="*",
        default=[],
        help="extra config overrides, each passed to the stages that read its section",
    )
    args = parser.parse_args(argv)
    sizes = LARGE_SIZES_MB if args.large else tuple(args.sizes_mb)
    if any(s <= 0 for s in sizes):
        raise LmpipeError(f"--sizes-mb {list(sizes)}: expected sizes above 0")
    results = {"cpu_count": os.cpu_count(), "load_avg_1m_start": os.getloadavg()[0], "runs": []}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for i, size in enumerate(sizes):
            results["runs"].append(measure(size, Path(tmp) / f"run{i}", list(args.overrides)))
    results["load_avg_1m_end"] = os.getloadavg()[0]
    atomic.write_json(args.out, results)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    run_main("data_scale", main)
