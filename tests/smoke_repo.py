"""The smoke pipeline as a user runs it, for the end-to-end tests: a throw-away git copy of this working tree
(tests/workspace.py) with the smoke experiment's params, and the commands `make train` runs in it (`dvc repro`,
then `python -m lmpipe.pipeline_run`). tests/test_pipeline_e2e.py (embedded sqlite store) and
tests/test_team_e2e.py (a tracking server on PostgreSQL) share it.

Not a test module (like tiny_models.py): tests import it by name through `pythonpath = ["tests", "scripts"]`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from workspace import run, workspace_copy

STAGES = (
    "prepare",
    "tokenize",
    "instructions",
    "pretrain",
    "sft",
    "encoder_mlm",
    "encoder_finetune",
    "encoder_distill",
    "distill",
    "preferences",
    "reward",
    "dpo",
    "rl",
    "export",
    "quantize",
    "evaluate",
    "register",
    "infer",
)
"""Every stage of dvc.yaml, in its order."""


def ran_stages(output: str) -> set[str]:
    """The stages `dvc repro` / `dvc exp run` output says it ran."""
    return {stage for stage in STAGES if f"Running stage '{stage}'" in output}


def fill_pipeline_run(pid: str, path: Path, env: dict) -> str:
    """`python -m lmpipe.pipeline_run --id <pid>`, as `make train` and `make exp` run it after the pipeline."""
    return run([sys.executable, "-m", "lmpipe.pipeline_run", "--id", pid], path, env)


def smoke_repo(folder: Path) -> tuple[Path, dict]:
    """`workspace_copy` at `folder`/lmpipe with the smoke experiment's params, committed; and the environment to
    run in it."""
    repo, env = workspace_copy(folder / "lmpipe")
    run(["lmpipe", "params", "experiment=smoke"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "smoke"], repo, env)
    return repo, env
