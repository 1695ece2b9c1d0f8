"""Benchmark: `lmpipe serve` under 1, 4 and 16 concurrent clients, continuous batching on against off.

Two servers run side by side on loopback, the same model and options but for `--max-running`: `on`
(`--max-running 16`, the default) and `off` (`--max-running 1`, one sequence at a time). At each `--clients`
level both get the same `--requests` requests, `--repeats` times, interleaved (on, off, then off, on) so that a
load change on the shared CPU hits both alike. The requests are a fixed, seeded mix: completions and chat
completions, streamed and not, prompts of three lengths and two `max_tokens` (fractions of the model's
context), greedy and seeded sampling (temperature 0.7, as the chat page samples; an eighth of all requests
also with top_p 0.9). Reported per level and mode: completion tokens/s and requests/s over the wall-clock of
the run, latency p50/p99 (request sent to last byte), time to first token p50/p99 (streamed requests: request
sent to the first piece of text), errors, server RSS, and the CPU seconds of server and client: the server's
CPU milliseconds per completion token change little with other load on the machine, unlike wall-clock rates.
Then the `--rss` phase: `--rss-warmup` requests to the `on` server at the top level, then `--rss-requests` more
with its RSS read every `--rss-every`; RSS is flat if it grows by at most 10 %.

The client is cheap on purpose, since it shares the CPU with the servers: one asyncio task per client, each
on its own keep-alive connection speaking HTTP/1.1 over raw sockets (no HTTP library), request bodies encoded
before the clock starts. Its CPU share is reported.

The model is `--model` (default: the one `lmpipe serve` serves, models/onnx/teacher-int8; a directory or a
`models:/` URI). `--random` serves randomly initialised weights of the conf/ model shape (plus `--overrides`)
instead, exported afresh, so the benchmark runs without a trained model.

    python bench/serve.py [--random] [--full] [--out bench/results/serve.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmpipe import atomic
from lmpipe.chat import load_chat_template, render
from lmpipe.errors import LmpipeError, positive_int, run_main
from lmpipe.formats import ONNX_FILE
from lmpipe.serve.config import ServeConfig
from lmpipe.tokenizer import TOKENIZER_FILE, load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "serve.json"
DEFAULT_MODEL = ServeConfig().model
"""What `lmpipe serve` serves without --model (relative to the repository root)."""
MODES = {"on": ServeConfig().max_running, "off": 1}
"""The two servers: --max-running of each (batching on at the server's default, and off)."""
TARGETS = {
    # name: (bound, "min": at least the bound, "max": at most)
    "tokens_per_sec_on_vs_off": (3.0, "min"),
    "latency_p99_on_vs_off": (1.0, "max"),
    "rss_growth_pct": (10.0, "max"),
}
"""Targets, judged at the top --clients level: batching's gain in tokens/s, its p99 latency against batching
off, and the RSS growth over the --rss phase."""
QUICK = {"requests": 128, "repeats": 2, "rss_warmup": 200, "rss_requests": 200, "rss_every": 50}
FULL = {"requests": 320, "repeats": 3, "rss_warmup": 2000, "rss_requests": 1000, "rss_every": 100}
"""Sizes of the default run (`make bench`, a few minutes) and of --full (the issue's 2,000 + 1,000 requests)."""
PROMPT_FRACTIONS = (1 / 16, 3 / 16, 6 / 16)
MAX_TOKENS_FRACTIONS = (1 / 4, 1 / 2)
"""Prompt lengths and max_tokens, as fractions of the context (128 tokens: prompts of 8, 24 and 48 tokens,
32 or 64 new ones); the longest pair leaves an eighth of the context free for the chat template."""
PASSAGE = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; and "
    "darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. And God "
    "said, Let there be light: and there was light. And God saw the light, that it was good: and God divided "
    "the light from the darkness. And God called the light Day, and the darkness he called Night. And the "
    "evening and the morning were the first day. And God said, Let there be a firmament in the midst of the "
    "waters, and let it divide the waters from the waters. And God made the firmament, and divided the waters "
    "which were under the firmament from the waters which were above the firmament: and it was so. And God "
    "called the firmament Heaven. And the evening and the morning were the second day. And God said, Let the "
    "waters under the heaven be gathered together unto one place, and let the dry land appear: and it was so."
)
"""The text prompts are cut from (Genesis 1:1-9, public domain): every tokenizer the pipeline trains reads it."""
CHAT_QUESTIONS = ("Continue the verse: ", "Which book of the Bible is this verse from?\n")


# --- the workload ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One request, ready to send: its path, its encoded JSON body, streamed or not, and its max_tokens."""

    path: str
    body: bytes
    stream: bool
    max_tokens: int


def workload(model_dir: Path, n: int, seed: int) -> list[Spec]:
    """`n` requests mixing completions and chat, streamed and not, three prompt lengths, two max_tokens,
    greedy and seeded sampling; the same for a given model and seed. Every prompt plus its max_tokens fits the
    model's context (counted with the model's own tokenizer and chat template, as the server counts)."""
    tok = load_tokenizer(model_dir / TOKENIZER_FILE)
    template = load_chat_template(model_dir)
    block = int(json.loads((model_dir / "config.json").read_text())["block_size"])
    ids = tok.encode(PASSAGE).ids
    rng = np.random.default_rng(seed)
    specs = []
    for i in range(n):
        length = max(1, int(block * PROMPT_FRACTIONS[i % len(PROMPT_FRACTIONS)]))
        max_tokens = max(1, int(block * MAX_TOKENS_FRACTIONS[(i // 3) % len(MAX_TOKENS_FRACTIONS)]))
        stream, chat = i % 2 == 1, i % 4 >= 2
        start = int(rng.integers(0, max(1, len(ids) - length)))
        text = tok.decode(ids[start : start + length]).strip() or PASSAGE[:20]
        body: dict = {"max_tokens": max_tokens, "stream": stream}
        draw = rng.random()
        if draw < 0.5:
            body["temperature"] = 0.0
        else:  # the chat page's default settings, and now and then a nucleus cut as well
            body |= {"temperature": 0.7, "seed": int(rng.integers(0, 2**31))}
            body |= {"top_p": 0.9} if draw >= 7 / 8 else {}
        if chat:
            content = CHAT_QUESTIONS[i % len(CHAT_QUESTIONS)] + text
            messages = [{"role": "user", "content": content}]
            prompt_tokens = len(tok.encode(render(messages, True, template)).ids)
            path, body = "/v1/chat/completions", body | {"messages": messages}
        else:
            prompt_tokens = len(tok.encode(text).ids)
            path, body = "/v1/completions", body | {"prompt": text}
        body["max_tokens"] = max_tokens = min(max_tokens, block - prompt_tokens)
        if max_tokens < 1:
            raise LmpipeError(
                f"a {prompt_tokens}-token prompt leaves no room in the context of {block} tokens"
            )
        specs.append(Spec(path, json.dumps(body).encode(), stream, max_tokens))
    return specs


# --- the client: HTTP/1.1 over asyncio streams ----------------------------------------------------------------


@dataclass
class Outcome:
    """What one request gave: HTTP status (or a stream's error), completion tokens, the seconds to the first
    piece of text (streams) and to the end."""

    status: int
    tokens: int = 0
    ttft: float | None = None
    latency: float = 0.0
    stream: bool = False
    estimated: bool = False
    """Streams that stopped before max_tokens: tokens counted as text pieces (a lower bound)."""


class Connection:
    """One keep-alive HTTP/1.1 connection to the server (reopened if the server closes it)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
            self.reader = self.writer = None

    async def send(self, spec: Spec) -> Outcome:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (
            f"POST {spec.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(spec.body)}\r\n\r\n"
        )
        started = time.perf_counter()
        self.writer.write(head.encode() + spec.body)
        status = int((await self.reader.readline()).split(b" ", 2)[1])
        length, chunked, close = 0, False, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding":
                chunked = "chunked" in value
            elif name == "connection":
                close = value == "close"
        outcome = Outcome(status, stream=spec.stream)
        if chunked:
            events = _Events(spec, started, outcome)
            while size := int((await self.reader.readline()).split(b";")[0], 16):
                events.feed((await self.reader.readexactly(size + 2))[:-2])
            while await self.reader.readline() not in (b"\r\n", b""):  # trailers
                pass
            events.finish()
        else:
            body = await self.reader.readexactly(length)
            if status == 200:
                outcome.tokens = json.loads(body)["usage"]["completion_tokens"]
        outcome.latency = time.perf_counter() - started
        if close:
            await self.close()
        return outcome


class _Events:
    """The server-sent events of a streamed answer: the first text's time, the pieces, the finish reason."""

    def __init__(self, spec: Spec, started: float, outcome: Outcome):
        self.spec, self.started, self.outcome = spec, started, outcome
        self.buffer, self.pieces, self.reason = b"", 0, None

    def feed(self, data: bytes) -> None:
        self.buffer += data
        *events, self.buffer = self.buffer.split(b"\n\n")
        for event in events:
            payload = event.removeprefix(b"data: ")
            if payload == b"[DONE]":
                continue
            message = json.loads(payload)
            if "error" in message:  # the status line said 200 before the error: count it as a 500
                self.outcome.status = 500
                continue
            choice = message["choices"][0]
            text = choice["delta"].get("content") if "delta" in choice else choice["text"]
            if text:
                self.pieces += 1
                if self.outcome.ttft is None:
                    self.outcome.ttft = time.perf_counter() - self.started
            self.reason = choice["finish_reason"] or self.reason

    def finish(self) -> None:
        """The stream's completion tokens: exactly max_tokens when it ran to the length limit, else one per
        piece of text (a piece is at least one token: a lower bound)."""
        if self.reason == "length":
            self.outcome.tokens = self.spec.max_tokens
        else:
            self.outcome.tokens, self.outcome.estimated = self.pieces, True


async def drive(host: str, port: int, specs: Sequence[Spec], clients: int) -> tuple[list[Outcome], float]:
    """Send `specs` from `clients` concurrent clients (each takes the next request once its last is answered);
    the outcomes and the wall-clock seconds from the first request to the last answer."""
    pending, outcomes = iter(specs), []

    async def client() -> None:
        connection = Connection(host, port)
        try:
            while (spec := next(pending, None)) is not None:
                outcomes.append(await connection.send(spec))
        finally:
            await connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return outcomes, time.perf_counter() - started


# --- the servers ----------------------------------------------------------------------------------------------


@dataclass
class Server:
    """A running `lmpipe serve` subprocess: its mode, port, process and log."""

    mode: str
    port: int
    proc: subprocess.Popen
    log: Path

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise LmpipeError(f"no VmRSS in /proc/{self.proc.pid}/status")

    def cpu_s(self) -> float:
        """User + system CPU seconds the server has used (all its threads)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            tail = " | ".join(self.log.read_text().strip().splitlines()[-3:])
            raise LmpipeError(f"the {self.mode} server exited with {self.proc.returncode}: {tail[-400:]}")


@contextlib.contextmanager
def servers(model_dir: Path, threads: int, logs: Path, startup_s: float = 120) -> Iterator[dict[str, Server]]:
    """One `lmpipe serve` per mode on free loopback ports, started together; stopped with SIGTERM on the way
    out. Their environment is this one's without an API key (the client sends none)."""
    env = {k: v for k, v in os.environ.items() if k != "LMPIPE_API_KEY"}
    running: dict[str, Server] = {}
    try:
        for mode, max_running in MODES.items():
            port, log = _free_port(), logs / f"server-{mode}.log"
            command = [sys.executable, "-m", "lmpipe.cli", "serve", "--model", str(model_dir)]
            command += ["--port", str(port), "--threads", str(threads), "--max-running", str(max_running)]
            with log.open("w") as out:
                proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            running[mode] = Server(mode, port, proc, log)
        deadline = time.monotonic() + startup_s
        for server in running.values():
            while not _answers(f"http://127.0.0.1:{server.port}/health"):
                server.check_alive()
                if time.monotonic() > deadline:
                    raise LmpipeError(f"the {server.mode} server did not answer within {startup_s:g} s")
                time.sleep(0.2)
        yield running
    finally:
        for server in running.values():
            server.proc.terminate()
        for server in running.values():
            try:
                server.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


# --- measuring ------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One drive of one server: the outcomes, the wall-clock and the CPU seconds of server and client."""

    outcomes: list[Outcome]
    wall_s: float
    server_cpu_s: float
    client_cpu_s: float
    rss_mb: float = field(default=0.0)


def measure(server: Server, specs: Sequence[Spec], clients: int) -> Run:
    server_cpu, client_cpu = server.cpu_s(), time.process_time()
    try:
        outcomes, wall = asyncio.run(drive("127.0.0.1", server.port, specs, clients))
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        server.check_alive()
        raise LmpipeError(
            f"the {server.mode} server broke the connection: {type(exc).__name__}: {exc}"
        ) from exc
    return Run(
        outcomes,
        wall,
        server.cpu_s() - server_cpu,
        time.process_time() - client_cpu,
        server.rss_mb(),
    )


def summary(runs: Sequence[Run]) -> dict:
    """Rates over the runs' summed wall-clock; latency and time-to-first-token percentiles over all their
    requests (answered ones: errors are counted apart)."""
    outcomes = [o for run in runs for o in run.outcomes]
    ok = [o for o in outcomes if o.status == 200]
    wall = sum(run.wall_s for run in runs)
    server_cpu, client_cpu = sum(r.server_cpu_s for r in runs), sum(r.client_cpu_s for r in runs)
    latency = [o.latency * 1000 for o in ok]
    ttft = [o.ttft * 1000 for o in ok if o.ttft is not None]
    streams = [o for o in ok if o.stream]

    def pct(values, q):
        return float(np.percentile(values, q)) if values else None

    return {
        "requests": len(outcomes),
        "errors": len(outcomes) - len(ok),
        "wall_s": wall,
        "completion_tokens": sum(o.tokens for o in ok),
        "tokens_per_sec": sum(o.tokens for o in ok) / wall,
        "requests_per_sec": len(ok) / wall,
        "latency_p50_ms": pct(latency, 50),
        "latency_p99_ms": pct(latency, 99),
        "ttft_p50_ms": pct(ttft, 50),
        "ttft_p99_ms": pct(ttft, 99),
        "streams": len(streams),
        "stream_tokens_estimated": sum(o.estimated for o in streams),
        "server_cpu_s": server_cpu,
        "server_cpu_ms_per_token": server_cpu * 1000 / max(1, sum(o.tokens for o in ok)),
        "client_cpu_s": client_cpu,
        "client_cpu_share": client_cpu / (client_cpu + server_cpu) if client_cpu + server_cpu else 0.0,
        "server_rss_mb": max(r.rss_mb for r in runs),
        "runs_tokens_per_sec": [
            sum(o.tokens for o in r.outcomes if o.status == 200) / r.wall_s for r in runs
        ],
    }


def load_levels(on_off: dict[str, Server], specs: list[Spec], clients: Sequence[int], repeats: int) -> dict:
    """Each level's summary per mode, the modes interleaved (on, off; then off, on; ...), and the ratios."""
    out = {}
    for level in clients:
        runs: dict[str, list[Run]] = {mode: [] for mode in on_off}
        for repeat in range(repeats):
            order = list(on_off) if repeat % 2 == 0 else list(reversed(on_off))
            for mode in order:
                runs[mode].append(measure(on_off[mode], specs, level))
        stats = {mode: summary(r) for mode, r in runs.items()}
        on, off = stats["on"], stats["off"]
        stats["on_vs_off"] = {
            "tokens_per_sec": on["tokens_per_sec"] / off["tokens_per_sec"],
            "requests_per_sec": on["requests_per_sec"] / off["requests_per_sec"],
            "latency_p50": on["latency_p50_ms"] / off["latency_p50_ms"],
            "latency_p99": on["latency_p99_ms"] / off["latency_p99_ms"],
            "ttft_p99": _ratio(on["ttft_p99_ms"], off["ttft_p99_ms"]),
            "server_cpu_per_token": on["server_cpu_ms_per_token"] / off["server_cpu_ms_per_token"],
        }
        out[str(level)] = stats
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def rss_phase(server: Server, specs: list[Spec], clients: int, warmup: int, every: int) -> dict:
    """RSS after `warmup` requests, then after every `every` of the rest; growth of the largest reading over
    the first, in per cent."""
    before = server.rss_mb()
    warm = measure(server, specs[:warmup], clients)
    start, samples, runs = warm.rss_mb, [], []
    for i in range(warmup, len(specs), every):
        runs.append(measure(server, specs[i : i + every], clients))
        samples.append(runs[-1].rss_mb)
    return {
        "rss_before_mb": before,
        "rss_after_warmup_mb": start,
        "samples_mb": samples,
        "rss_end_mb": samples[-1],
        "growth_pct": (max(samples) - start) / start * 100,
        "end_growth_pct": (samples[-1] - start) / start * 100,
        "warmup_requests": warmup,
        "measured_requests": len(specs) - warmup,
        "errors": sum(o.status != 200 for run in [warm, *runs] for o in run.outcomes),
        "measured": summary(runs),
    }


def judge(values: dict) -> dict:
    out = {}
    for name, (bound, kind) in TARGETS.items():
        value = values[name]
        holds = value >= bound if kind == "min" else value <= bound
        out[name] = {"value": value, "target": f"{'>=' if kind == 'min' else '<='} {bound:g}", "holds": holds}
    return out


# --- putting it together --------------------------------------------------------------------------------------


def _inference_bench():
    """bench/inference.py as a module: its random model and machine description, shared rather than copied."""
    spec = importlib.util.spec_from_file_location("bench_inference", Path(__file__).with_name("inference.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # its dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def model_to_serve(args, scratch: Path) -> tuple[Path, dict]:
    """The ONNX export directory both servers load, and where it came from."""
    if args.random:
        from lmpipe import config
        from lmpipe.export import ExportConfig, export_onnx

        cfg = config.compose(args.overrides, conf_dir=ROOT / "conf")
        model_dir = _inference_bench().random_model_dir(cfg, scratch / "model", int(cfg.seed))
        export_onnx(model_dir, scratch / "onnx", ExportConfig(), int(cfg.seed), variant_name="bench-random")
        return scratch / "onnx", {
            "model": "random weights",
            "random": True,
            "overrides": list(args.overrides),
        }
    if args.model.startswith("models:/"):
        from lmpipe.inference.resolver import resolve_model

        directory = resolve_model(args.model)
    else:
        directory = Path(args.model)
        directory = directory if directory.is_absolute() else ROOT / directory
    if not (directory / ONNX_FILE).is_file():
        raise LmpipeError(
            f"missing {directory / ONNX_FILE}: run `make train` first, pass --model, or use --random"
        )
    return directory, {"model": args.model, "random": False}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file (default: %(default)s)")
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="ONNX export dir or models:/ URI (default: %(default)s)"
    )
    p.add_argument("--random", action="store_true", help="random weights of the conf/ model shape instead")
    p.add_argument(
        "--overrides", nargs="*", default=[], help="Hydra overrides for --random, e.g. model=gpt-tiny"
    )
    p.add_argument(
        "--threads", type=positive_int, default=1, help="each server's threads (default: %(default)s)"
    )
    p.add_argument(
        "--clients", type=positive_int, nargs="+", default=[1, 4, 16], help="levels (default: %(default)s)"
    )
    p.add_argument("--full", action="store_true", help=f"the issue's sizes: {FULL}")
    for name, value in QUICK.items():
        p.add_argument(
            f"--{name.replace('_', '-')}", type=positive_int, help=f"(default {value}, --full {FULL[name]})"
        )
    p.add_argument("--seed", type=int, default=0, help="seed of the request mix (default: %(default)s)")
    args = p.parse_args(argv)
    for name in QUICK:
        if getattr(args, name) is None:
            setattr(args, name, (FULL if args.full else QUICK)[name])
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark, write the JSON results to --out, print a table and return the results."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lmpipe-bench-serve-") as scratch:
        results = run(args, Path(scratch))
    atomic.write_json(args.out, results)
    print(table(results, args.out))
    return results


def run(args, scratch: Path) -> dict:
    model_dir, source = model_to_serve(args, scratch)
    onnx_config = json.loads((model_dir / "config.json").read_text())
    top = max(args.clients)
    specs = workload(model_dir, args.requests, args.seed)
    rss_specs = workload(model_dir, args.rss_warmup + args.rss_requests, args.seed + 1)
    load_start = os.getloadavg()[0]
    with servers(model_dir, args.threads, scratch) as on_off:
        for server in on_off.values():  # warm-up: the first runs allocate and pick kernels
            measure(server, specs[: 2 * top], top)
        levels = load_levels(on_off, specs, args.clients, args.repeats)
        rss = rss_phase(on_off["on"], rss_specs, top, args.rss_warmup, args.rss_every)
    load_end = os.getloadavg()[0]
    machine = _inference_bench().machine_info(args.threads)
    top_ratios = levels[str(top)]["on_vs_off"]
    return {
        "machine": machine | {"load_avg_1m_start": load_start, "load_avg_1m_end": load_end},
        "model": source
        | {
            "dir": str(model_dir),
            "variant": onnx_config.get("variant"),
            "quantization": onnx_config.get("quantization", "fp32"),
            "config": onnx_config.get("model"),
        },
        "settings": {
            "clients": list(args.clients),
            "max_running": MODES,
            "server_threads": args.threads,
            "full": args.full,
            "seed": args.seed,
            **{name: getattr(args, name) for name in QUICK},
            "prompt_tokens": [int(onnx_config["block_size"] * f) for f in PROMPT_FRACTIONS],
            "max_tokens": [int(onnx_config["block_size"] * f) for f in MAX_TOKENS_FRACTIONS],
            "mix": "alternately streamed; half chat, half completions; half greedy, half sampled (temperature "
            "0.7, seeded; a quarter of those also top_p 0.9)",
            "client": "asyncio, raw HTTP/1.1, one keep-alive connection per client, in the benchmark's process",
        },
        "load": levels,
        "rss": rss,
        "targets_clients": top,
        "targets": judge(
            {
                "tokens_per_sec_on_vs_off": top_ratios["tokens_per_sec"],
                "latency_p99_on_vs_off": top_ratios["latency_p99"],
                "rss_growth_pct": rss["growth_pct"],
            }
        ),
    }


def table(r: dict, out: Path) -> str:
    m, model, s = r["machine"], r["model"], r["settings"]
    lines = [
        f"machine: {m['cpu_count']} CPUs ({m['cpu_model']}), server threads {s['server_threads']}, onnxruntime "
        f"{m['onnxruntime_version']}, load avg {m['load_avg_1m_start']:.2f} -> {m['load_avg_1m_end']:.2f}",
        f"model: {model['model']} ({model['variant']}, {model['quantization']}); {s['requests']} requests per run, "
        f"{s['repeats']} runs per mode, on/off interleaved",
        "",
        f"{'clients':>7} {'mode':<4} {'tok/s':>8} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'ttft p50':>9} "
        f"{'ttft p99':>9} {'RSS MB':>7} {'CPU ms/tok':>10} {'client CPU':>10} {'errors':>6}",
    ]
    for level, stats in r["load"].items():
        for mode in MODES:
            x = stats[mode]
            lines.append(
                f"{level:>7} {mode:<4} {x['tokens_per_sec']:8.0f} {x['requests_per_sec']:7.1f} "
                f"{x['latency_p50_ms']:8.0f} {x['latency_p99_ms']:8.0f} {x['ttft_p50_ms'] or 0:9.0f} "
                f"{x['ttft_p99_ms'] or 0:9.0f} {x['server_rss_mb']:7.0f} {x['server_cpu_ms_per_token']:10.2f} "
                f"{x['client_cpu_share']:10.0%} "
                f"{x['errors']:6d}"
            )
        ratio = stats["on_vs_off"]
        lines.append(
            f"{'':>7} on/off tokens/s {ratio['tokens_per_sec']:.2f}x, p99 latency {ratio['latency_p99']:.2f}x, "
            f"server CPU per token {ratio['server_cpu_per_token']:.2f}x"
        )
    rss = r["rss"]
    lines += [
        f"RSS: {rss['rss_after_warmup_mb']:.0f} MB after {rss['warmup_requests']} requests, largest "
        f"{max(rss['samples_mb']):.0f} MB over {rss['measured_requests']} more ({rss['growth_pct']:+.1f} %), "
        f"{rss['errors']} errors",
        f"targets ({r['targets_clients']} clients):",
    ]
    for name, t in r["targets"].items():
        lines.append(f"  {name:<26}{t['value']:9.3f}  {t['target']:<7} {'holds' if t['holds'] else 'MISSED'}")
    lines.append(f"-> {out}")
    return "\n".join(lines)


if __name__ == "__main__":
    run_main("serve", main)
