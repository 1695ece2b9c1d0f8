"""The retraining job (`make retrain`), the same on a laptop and in GitHub Actions (.github/workflows/retrain.yml).

1. The DVC remote: `$DVC_REMOTE_URL` if set (added as the `--local` default remote `retrain`, so .dvc/config
   stays as committed), else the repository's default remote. It must take a write before anything runs: one
   small content-addressed object is stored in it, as `dvc push` stores files. DVC itself reports an
   unreachable remote as one whose files are missing (a pull "succeeds" and everything retrains, then the
   push fails hours later), and a read-only one only at the push.
2. `dvc pull --allow-missing`: a first, empty remote has nothing to give, and every stage then runs.
3. `dvc repro` with `LMPIPE_PIPELINE_ID` set (default `retrain-<UTC time>`): every stage run lands under one
   MLflow pipeline run; `register` applies the promotion gate. Then `python -m lmpipe.pipeline_run`, as
   `make train` runs it.
4. `dvc push`, also after a failed repro (the finished stages need not run again), then `dvc status -c`: the
   push counts as done only when the remote holds every output.
5. The summary (Markdown, `--summary`): what ran, the registry gate's decision, the push's outcome, and
   `dvc metrics diff` / `dvc params diff` against `--base`.

Any failure is one line on stderr, `retrain: ...`, and a non-zero exit; the summary is written in every case
after step 1, saying which step failed, and never claims a push that the remote does not hold.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from lmpipe import atomic

CI_REMOTE = "retrain"
"""The name under which `$DVC_REMOTE_URL` is added (to .dvc/config.local only)."""
PROBE = b"lmpipe retrain: this DVC remote takes writes\n"
"""The object stored to check that the remote takes writes (content-addressed, so every probe is one file)."""
PROBE_TIMEOUT_S = 120
"""How long the remote has to take the probe before it counts as unreachable."""
REGISTER_JSON = "metrics/register.json"
"""The register stage's record of versions, aliases and the gate's decision."""
STAGE_RAN = re.compile(r"^Running stage '([^']+)'", re.MULTILINE)


class RetrainError(Exception):
    """A step failed; the message is the one line to print."""


@dataclass
class Outcome:
    """What each step of one retrain did, for the summary and the exit status."""

    pipeline_id: str
    remote: str
    base: str
    stages_run: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    """One line per failed step, in order."""
    pushed: bool = False


def one_line(text: str) -> str:
    """The last ERROR line of DVC's output (its own one-line reason), else the last non-empty line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line.removeprefix("ERROR:").strip() for line in lines if line.startswith("ERROR:")]
    return (errors or lines or ["no output"])[-1]


def run(cmd: list[str], env: dict | None = None, echo: bool = True) -> tuple[int, str]:
    """Run `cmd`, echoing its output as it comes (a repro takes hours) and returning (exit status, output)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    chunks = []
    for line in proc.stdout:
        chunks.append(line)
        if echo:
            sys.stdout.write(line)
            sys.stdout.flush()
    return proc.wait(), "".join(chunks)


def dvc(*args: str, env: dict | None = None, echo: bool = True) -> tuple[int, str]:
    return run(["dvc", *args], env=env, echo=echo)


def remote_url(name: str) -> str:
    """The URL configured for the DVC remote `name`."""
    rc, out = dvc("remote", "list", echo=False)
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == name:
            return parts[1]
    raise RetrainError(f"no DVC remote named '{name}' ({one_line(out)})")


def choose_remote(url: str | None) -> str:
    """The remote to use: `url` added as the local default `retrain`, else the configured default."""
    if url:
        rc, out = dvc("remote", "add", "--local", "--default", "--force", CI_REMOTE, url, echo=False)
        if rc:
            raise RetrainError(f"cannot add DVC remote {url}: {one_line(out)}")
        return CI_REMOTE
    rc, out = dvc("remote", "default", echo=False)
    name = out.strip().splitlines()[-1].strip() if rc == 0 and out.strip() else ""
    if not name or " " in name:
        raise RetrainError(
            "no DVC remote: set DVC_REMOTE_URL, or add a default one (dvc remote add -d NAME URL)"
        )
    return name


def probe_remote(name: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Store PROBE in the remote `name` as `dvc push` stores a file; a one-line RetrainError if it cannot."""
    from dvc.repo import Repo
    from dvc_objects.fs.local import LocalFileSystem

    url = remote_url(name)
    oid = hashlib.md5(PROBE).hexdigest()
    failure: list[str] = []

    def store() -> None:
        try:
            with tempfile.TemporaryDirectory() as tmp, Repo(".") as repo:
                local = Path(tmp) / "probe"
                local.write_bytes(PROBE)
                odb = repo.cloud.get_remote_odb(name)
                odb.add(str(local), LocalFileSystem(), oid)
                if not odb.exists(oid):
                    failure.append("the object it took is not there")
        except Exception as exc:  # any filesystem's error: the remote cannot be used, whatever the cause
            failure.append(
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
            )

    worker = threading.Thread(target=store, daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        failure.append(f"no answer within {timeout_s:.0f} s")
    if failure:
        raise RetrainError(
            f"DVC remote '{name}' ({url}) cannot be written ({failure[0]}): check that it is reachable and "
            f"writable (URL, credentials, permissions); nothing was run or pushed"
        )


def not_on_remote(name: str, env: dict) -> str | None:
    """Why the remote `name` does not hold every cached output (`dvc status -c`), or None if it does."""
    proc = subprocess.run(
        ["dvc", "status", "-c", "-r", name, "--json"], env=env, capture_output=True, text=True
    )
    if proc.returncode:
        return f"dvc status -c failed: {one_line(proc.stdout + proc.stderr)}"
    status = json.loads(proc.stdout or "{}")
    return f"{len(status)} outputs not on it ({', '.join(sorted(status)[:3])})" if status else None


def registry_line(path: Path = Path(REGISTER_JSON)) -> str:
    """The gate's decision as one Markdown line, from the register stage's record."""
    if not path.is_file():
        return "**Model registry:** no `register.json` (the register stage has not run)."
    record = json.loads(path.read_text(encoding="utf-8"))
    decision = record.get("decision", {})
    candidate = decision.get("candidate", {})
    aliases = ", ".join(
        f"`{alias}` v{version}" for alias, version in sorted(record.get("aliases", {}).items())
    )
    return (
        f"**Model registry:** `{record.get('model_name', '?')}` candidate v{candidate.get('version', '?')} "
        f"({candidate.get('variant', '?')}): {'promoted' if decision.get('promoted') else 'not promoted'}. "
        f"{decision.get('reason', '(no decision recorded)')}. Aliases now: {aliases or 'none'}."
    )


def diff_section(kind: str, base: str) -> str:
    """`dvc metrics diff --md` (or params) against `base`, or a line saying why there is none."""
    rc, out = dvc(kind, "diff", "--md", base, echo=False)
    if rc:
        return f"(`dvc {kind} diff {base}` failed: {one_line(out)})"
    table = out.strip()
    # With nothing changed DVC still prints the table's header and rule.
    return table if len(table.splitlines()) > 2 else f"(no {kind} changed against {base})"


def summary(outcome: Outcome, registry: str, metrics: str, params: str) -> str:
    """The retrain's Markdown report."""
    lines = [f"# Retrain `{outcome.pipeline_id}`", ""]
    if os.environ.get("GITHUB_RUN_ID"):
        server, repo = os.environ.get("GITHUB_SERVER_URL", ""), os.environ.get("GITHUB_REPOSITORY", "")
        run_id = os.environ["GITHUB_RUN_ID"]
        event = os.environ.get("GITHUB_EVENT_NAME", "?")
        lines += [
            f"Automated retrain (run [{run_id}]({server}/{repo}/actions/runs/{run_id}), trigger: {event}).",
            "",
        ]
    status = "**FAILED**: " + "; ".join(outcome.failures) if outcome.failures else "succeeded"
    lines += [
        f"**Status:** {status}.",
        "",
        f"**Stages run:** {', '.join(outcome.stages_run) or 'none (all up to date)'}.",
        "",
        registry,
        "",
        f"**DVC remote `{outcome.remote}`:** "
        + (
            "pushed; every output is on the remote (`dvc status -c` clean)."
            if outcome.pushed
            else "**not pushed**: the remote does not hold this run's outputs."
        ),
        "",
        f"## Metrics vs {outcome.base}",
        "",
        metrics,
        "",
        f"## Params vs {outcome.base}",
        "",
        params,
        "",
    ]
    return "\n".join(lines)


def retrain(remote_url_env: str | None, base: str, summary_path: Path, pipeline_id: str) -> Outcome:
    name = choose_remote(remote_url_env)
    probe_remote(name)
    outcome = Outcome(pipeline_id, name, base)
    env = {**os.environ, "LMPIPE_PIPELINE_ID": pipeline_id}
    try:
        rc, out = dvc("pull", "--allow-missing", "-r", name, env=env)
        if rc:
            # Nothing ran yet: stop rather than retrain from scratch what the remote may well hold.
            outcome.failures.append(f"dvc pull from '{name}' failed: {one_line(out)}")
            return outcome
        rc, out = dvc("repro", env=env)
        outcome.stages_run = STAGE_RAN.findall(out)
        if rc:
            outcome.failures.append(f"dvc repro failed: {one_line(out)}")
        cmd = [
            sys.executable,
            "-m",
            "lmpipe.pipeline_run",
            "--id",
            pipeline_id,
            *(["--failed"] if rc else []),
        ]
        prc, pout = run(cmd, env=env)
        if prc:
            outcome.failures.append(f"pipeline run not recorded: {one_line(pout)}")
        rc, out = dvc("push", "-r", name, env=env)
        if rc:
            outcome.failures.append(f"dvc push to '{name}' failed: {one_line(out)}")
        else:
            missing = not_on_remote(name, env)
            if missing:
                outcome.failures.append(f"dvc push to '{name}' incomplete: {missing}")
            else:
                outcome.pushed = True
        return outcome
    finally:
        text = summary(outcome, registry_line(), diff_section("metrics", base), diff_section("params", base))
        atomic.write_text(summary_path, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/retrain.py",
        description="Pull, reproduce, push, and summarise the changes as Markdown (make retrain).",
    )
    parser.add_argument(
        "--summary", type=Path, default=Path("retrain-summary.md"), help="where the Markdown summary goes"
    )
    parser.add_argument(
        "--base", default="HEAD", help="the git revision metrics and params are compared with"
    )
    args = parser.parse_args(argv)
    pipeline_id = os.environ.get("LMPIPE_PIPELINE_ID") or time.strftime(
        "retrain-%Y%m%d-%H%M%S", time.gmtime()
    )
    try:
        outcome = retrain(os.environ.get("DVC_REMOTE_URL") or None, args.base, args.summary, pipeline_id)
    except RetrainError as exc:
        print(f"retrain: {exc}", file=sys.stderr)
        return 1
    if outcome.failures:
        print(f"retrain: {'; '.join(outcome.failures)} (summary: {args.summary})", file=sys.stderr)
        return 1
    print(f"retrain: done, pipeline {pipeline_id}, pushed to '{outcome.remote}' (summary: {args.summary})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
