"""The smoke pipeline as a user runs it, for the end-to-end tests: a throw-away git copy of this working tree with
the smoke experiment's params, and the commands `make train` runs in it (`dvc repro`, then `python -m
lmpipe.pipeline_run`). tests/test_pipeline_e2e.py (embedded sqlite store) and tests/test_team_e2e.py (a
tracking server on PostgreSQL) share it.

Not a test module (like tiny_models.py): tests import it by name through `pythonpath = ["tests", "scripts"]`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
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


def run(cmd: list[str], cwd: Path, env: dict, timeout: int = 600) -> str:
    """Run `cmd`; its stdout and stderr together, or a failed assertion with their end."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-4000:]}"
    return output


def ran_stages(output: str) -> set[str]:
    """The stages `dvc repro` / `dvc exp run` output says it ran."""
    return {stage for stage in STAGES if f"Running stage '{stage}'" in output}


def fill_pipeline_run(pid: str, path: Path, env: dict) -> str:
    """`python -m lmpipe.pipeline_run --id <pid>`, as `make train` and `make exp` run it after the pipeline."""
    return run([sys.executable, "-m", "lmpipe.pipeline_run", "--id", pid], path, env)


def smoke_repo(folder: Path) -> tuple[Path, dict]:
    """A git repo `folder`/lmpipe holding this working tree's files (tracked and new, not ignored) with the smoke
    experiment's params, committed; and the environment to run in it (this one's without MLFLOW_*, LMPIPE_* and
    DVC_EXP* variables, the venv first on PATH, a git identity)."""
    repo = folder / "lmpipe"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LMPIPE_", "DVC_EXP"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        DVC_NO_ANALYTICS="1",
        GIT_AUTHOR_NAME="e2e",
        GIT_AUTHOR_EMAIL="e2e@example.invalid",
        GIT_COMMITTER_NAME="e2e",
        GIT_COMMITTER_EMAIL="e2e@example.invalid",
    )
    run(["git", "init", "-q", "-b", "main"], repo, env)
    run(["lmpipe", "params", "experiment=smoke"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "smoke"], repo, env)
    return repo, env
