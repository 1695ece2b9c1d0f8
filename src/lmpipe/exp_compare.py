"""DVC experiments side by side, as a table a terminal can show: `lmpipe compare` (`make compare`).

`dvc exp show` prints every param and every metric of every variant (close to a thousand columns), which no
terminal shows. This reads its JSON and prints one column per experiment (the baseline commit first, then its
experiments, newest first) and one row per params.yaml key that differs between them and per headline figure
(lmpipe.pipeline_run.HEADLINES, the same figures the MLflow pipeline run carries), so the two sides of the
project's tooling compare the same things. With `--plots`, `dvc plots diff` of the two newest experiments
writes its HTML there.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from lmpipe import config
from lmpipe.errors import LmpipeError
from lmpipe.pipeline_run import HEADLINES, dvc_command, headline_figures


@dataclass(frozen=True)
class Column:
    """One revision of `dvc exp show`: the baseline commit or one of its experiments."""

    name: str
    timestamp: str
    experiment: bool
    """False for a baseline commit."""
    params: dict[str, object]
    """params.yaml flattened as section.key."""
    figures: dict[str, float]
    """Headline figures by `<stage>.<figure>`."""


def exp_show(args: Sequence[str] = ()) -> list[dict]:
    """`dvc exp show --json` parsed; one line naming what failed otherwise."""
    cmd = [dvc_command(), "exp", "show", "--json", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:
        raise LmpipeError(f"cannot run dvc: {exc} (run 'make setup')") from exc
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise LmpipeError(f"'{' '.join(['dvc', *cmd[1:]])}' failed ({proc.returncode}): {last}")
    return json.loads(proc.stdout or "[]")


def columns(shown: list[dict], paths: Mapping[str, str]) -> list[Column]:
    """The baseline commits and their experiments in `dvc exp show --json` output (the workspace row is left
    out: after `dvc exp run` it repeats the last experiment); `paths` gives params.yaml's paths.metrics and
    paths.tokens as `metrics` and `tokens`."""
    files = {h.file.format(**paths): h.file for h in HEADLINES}

    def column(entry: dict, name: str, experiment: bool) -> Column:
        data = entry.get("data") or {}
        params = (data.get("params") or {}).get("params.yaml", {}).get("data") or {}
        metrics = {
            files[path]: body["data"]
            for path, body in (data.get("metrics") or {}).items()
            if path in files and isinstance(body.get("data"), dict)
        }
        stamp = data.get("timestamp") or ""
        return Column(name, stamp, experiment, config.flatten(params), headline_figures(metrics))

    out = []
    for baseline in shown:
        if baseline.get("rev") == "workspace":
            continue
        out.append(column(baseline, baseline.get("name") or baseline["rev"][:7], False))
        exps = [rev for group in baseline.get("experiments") or [] for rev in group.get("revs", [])]
        exps.sort(key=lambda rev: (rev.get("data") or {}).get("timestamp") or "", reverse=True)
        out.extend(column(rev, rev.get("name") or rev["rev"][:7], True) for rev in exps)
    return out


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def table(cols: Sequence[Column], only_changed: bool = False) -> str:
    """A Markdown table: changed params, then the headline figures (all, or with `only_changed` those that
    differ), one column per experiment."""
    if not cols:
        return "no experiments: run 'make exp ARGS=\"-S optimizer.lr=0.002\"' (or dvc exp run) first\n"
    keys = sorted({k for c in cols for k in c.params})
    changed = [k for k in keys if len({json.dumps(c.params.get(k), sort_keys=True) for c in cols}) > 1]
    figures = list(dict.fromkeys(k for c in cols for k in c.figures))
    if only_changed:
        figures = [k for k in figures if len({c.figures.get(k) for c in cols}) > 1]
    lines = [
        "| | " + " | ".join(c.name for c in cols) + " |",
        "|---|" + "---:|" * len(cols),
        "| created | " + " | ".join(c.timestamp.replace("T", " ") for c in cols) + " |",
    ]
    lines += [f"| **{k}** | " + " | ".join(_cell(c.params.get(k)) for c in cols) + " |" for k in changed]
    lines += [f"| {k} | " + " | ".join(_cell(c.figures.get(k)) for c in cols) + " |" for k in figures]
    note = "" if changed else "\n(no params differ between these revisions)\n"
    return "\n".join(lines) + "\n" + note


def newest_experiments(cols: Sequence[Column], n: int = 2) -> list[str]:
    """The names of the `n` newest experiments (not baseline commits), newest first."""
    exps = [c for c in cols if c.experiment]
    return [c.name for c in sorted(exps, key=lambda c: c.timestamp, reverse=True)[:n]]


def plots_diff(revs: Sequence[str], out_dir: str) -> tuple[str, str | None]:
    """`dvc plots diff` of `revs` into `out_dir`: the HTML file, and DVC's warning when some revision had no
    plot data (an experiment keeps a plot only if its output is cached or committed)."""
    cmd = [dvc_command(), "plots", "diff", *revs, "-o", out_dir]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise LmpipeError(f"'{' '.join(['dvc', *cmd[1:]])}' failed ({proc.returncode}): {last}")
    output = (proc.stdout + proc.stderr).splitlines()
    warning = next((line.strip() for line in output if "failed to load" in line), None)
    return f"{out_dir}/index.html", warning


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lmpipe.exp_compare",
        description="DVC experiments side by side: changed params and headline figures, one column each. "
        "Other options go to 'dvc exp show' (e.g. -A for the experiments of every commit).",
    )
    parser.add_argument("--only-changed", action="store_true", help="only the figures that differ")
    parser.add_argument(
        "--plots", metavar="DIR", help="also 'dvc plots diff' the two newest experiments into DIR"
    )
    args, rest = parser.parse_known_args(argv)
    try:
        params = config.load(params_file=config.PARAMS_FILE)
        cols = columns(exp_show(rest), {"metrics": params.paths.metrics, "tokens": params.paths.tokens})
        print(table(cols, only_changed=args.only_changed), end="")
        if args.plots:
            newest = newest_experiments(cols)
            if len(newest) < 2:
                raise LmpipeError(f"--plots needs two experiments, found {len(newest)}: run 'make exp' twice")
            html, warning = plots_diff(newest[::-1], args.plots)
            print(f"\ncompare: {html} ({' against '.join(newest[::-1])})")
            if warning:
                print(
                    f"compare: {warning} (plots that are `cache: false` in dvc.yaml stay out of experiments)"
                )
    except LmpipeError as exc:
        print(f"compare: error: {config.one_line(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
