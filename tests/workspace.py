"""A throw-away git copy of this working tree, to run the real pipeline (DVC, MLflow) in as a user would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], cwd: Path, env: dict, timeout: int = 600) -> str:
    """Run `cmd`, asserting it succeeds; returns its stdout and stderr together."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-4000:]}"
    return output


def workspace_copy(repo: Path) -> tuple[Path, dict]:
    """A new git repository at `repo` holding this working tree's files (tracked and new, not ignored), and the
    environment to run in it: this venv first on PATH, no tracking or DVC variables from outside."""
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
    return repo, env
