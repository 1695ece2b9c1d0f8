"""A grid search over Hydra overrides for one stage, run without DVC (`make sweep`, `python -m lmpipe.sweep`).

`python -m lmpipe.sweep pretrain experiment=smoke optimizer.lr=1e-3,3e-3 trainer.max_steps=50,100` runs
`pipelines/pretrain.py` once per point of the grid, one after the other (each trial already uses every core).
The grid uses Hydra's sweep syntax, expanded as `--multirun` expands it: `a=1,2`, `a=choice(1,2)`,
`a=range(1,4)`; an override without a sweep is given to every trial.

Each trial writes under `<out>/<sweep name>/<n>/` (the `--isolate` paths: by default the models, checkpoints,
metrics and plots folders), so trials neither overwrite each other nor the pipeline's own outputs (nor resume from
another trial's checkpoints). In MLflow the trials are grouped: all share the pipeline id `<sweep name>`, so
their stage runs are the children of one parent run, `pipeline <sweep name>`, each named by its overrides and
tagged `lmpipe.trial`; tick them in the runs table and press *Compare*. The sweep ends with a table of each
trial's `--metric` (read from its `metrics/<stage>.json`) and the best trial, also in `<out>/<name>/summary.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lmpipe import atomic, config, tracking
from lmpipe.errors import LmpipeError
from lmpipe.stage import stage_scripts

ISOLATED = ("paths.models", "paths.checkpoints", "paths.metrics", "paths.plots")
"""The path settings each trial gets its own folder for, unless --isolate says otherwise."""


@dataclass
class Trial:
    """One point of the grid and what it gave."""

    number: int
    overrides: list[str]
    """The overrides that vary across the sweep (the fixed ones are the same for every trial)."""
    exit_code: int | None = None
    metric: float | None = None
    seconds: float = 0.0

    @property
    def label(self) -> str:
        return " ".join(self.overrides) or "(no sweep)"


def grid(overrides: list[str]) -> tuple[list[str], list[list[str]]]:
    """(the fixed overrides, the varying overrides of each trial) of a Hydra sweep, in `--multirun` order."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
        fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
        sweeps = [o for o in parsed if o.is_sweep_override()]
        points = BasicSweeper.split_arguments(sweeps, None)[0] if sweeps else [[]]
    except HydraException as exc:
        raise LmpipeError(f"sweep overrides: {config.one_line(exc)}") from None
    return fixed, [list(point) for point in points]


def metric_value(metrics_file: Path, key: str) -> float | None:
    """The dotted `key` of a stage's metrics JSON, or None when the file or the key is missing."""
    if not metrics_file.is_file():
        return None
    value = json.loads(metrics_file.read_text(encoding="utf-8"))
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def run_sweep(
    stage: str,
    overrides: list[str],
    name: str,
    out: Path,
    metric: str = "val_loss",
    mode: str = "min",
    isolate: tuple[str, ...] = ISOLATED,
) -> list[Trial]:
    """Run every trial of the grid; returns them with their exit codes and metric values."""
    scripts = stage_scripts()
    if stage not in scripts:
        raise LmpipeError(f"stage '{stage}': not a stage; expected one of {', '.join(sorted(scripts))}")
    fixed, points = grid(overrides)
    root = out / name
    if root.exists():
        raise LmpipeError(f"{root} exists: name the sweep anew (--name) or remove that folder")
    trials = [Trial(n, point) for n, point in enumerate(points)]
    print(f"sweep {name}: {len(trials)} trials of {stage}, outputs under {root}", flush=True)
    for trial in trials:
        folder = root / str(trial.number)
        own = [f"{key}={folder / key.split('.')[-1]}" for key in isolate]
        env = os.environ | {tracking.PIPELINE_ID_ENV: name, tracking.TRIAL_ENV: trial.label}
        command = [sys.executable, str(scripts[stage].path), *fixed, *trial.overrides, *own]
        print(f"sweep {name} [{trial.number}] {trial.label}", flush=True)
        started = time.perf_counter()
        trial.exit_code = subprocess.run(command, env=env).returncode
        trial.seconds = round(time.perf_counter() - started, 1)
        trial.metric = metric_value(folder / "metrics" / f"{stage}.json", metric)
    write_summary(root / "summary.json", stage, metric, mode, trials)
    return trials


def best(trials: list[Trial], mode: str) -> Trial | None:
    """The finished trial with the lowest (mode min) or highest (max) metric."""
    scored = [t for t in trials if t.exit_code == 0 and t.metric is not None]
    pick = min if mode == "min" else max
    return pick(scored, key=lambda t: t.metric) if scored else None


def write_summary(path: Path, stage: str, metric: str, mode: str, trials: list[Trial]) -> None:
    winner = best(trials, mode)
    atomic.write_json(
        path,
        {
            "stage": stage,
            "metric": metric,
            "mode": mode,
            "best": winner.number if winner else None,
            "trials": [asdict(t) for t in trials],
        },
    )


def table(trials: list[Trial], metric: str, mode: str) -> str:
    """The trials as a Markdown table, the best one marked."""
    winner = best(trials, mode)
    lines = [f"| trial | overrides | {metric} | seconds | |", "|---:|---|---:|---:|---|"]
    for t in trials:
        value = "failed" if t.exit_code != 0 else "-" if t.metric is None else f"{t.metric:.4f}"
        mark = "best" if t is winner else ""
        lines.append(f"| {t.number} | {t.label} | {value} | {t.seconds:.0f} | {mark} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lmpipe.sweep",
        description="Run one stage over a grid of Hydra overrides (a=1,2 b=choice(x,y) c=range(1,4)), "
        "each trial in its own output folders, all grouped under one MLflow parent run.",
    )
    parser.add_argument("stage", help="the stage to run (pipelines/<stage>.py)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides; a comma list or choice/range sweeps")
    parser.add_argument("--name", help="the sweep's name and pipeline id (default sweep-<date>-<time>)")
    parser.add_argument("--out", default="sweeps", help="the folder that holds each sweep's trials")
    parser.add_argument("--metric", default="val_loss", help="dotted key of metrics/<stage>.json to rank by")
    parser.add_argument("--mode", choices=("min", "max"), default="min", help="lower or higher is better")
    parser.add_argument(
        "--isolate",
        default=",".join(ISOLATED),
        help="comma-separated path settings each trial gets its own folder for (e.g. paths.sft,... for sft, "
        "which reads the pretrained model from paths.models)",
    )
    args = parser.parse_intermixed_args(argv)  # options may follow the overrides
    name = args.name or time.strftime("sweep-%Y%m%d-%H%M%S")
    isolate = tuple(key.strip() for key in args.isolate.split(",") if key.strip())
    try:
        trials = run_sweep(args.stage, args.overrides, name, Path(args.out), args.metric, args.mode, isolate)
    except LmpipeError as exc:
        print(f"sweep: error: {config.one_line(exc)}", file=sys.stderr)
        return 2
    print(table(trials, args.metric, args.mode), end="")
    failed = [str(t.number) for t in trials if t.exit_code != 0]
    if failed:
        print(f"sweep: error: trial(s) {', '.join(failed)} failed (their output is above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
