"""scripts/retrain.py (`make retrain`): a DVC remote that cannot be used stops the job in one line, before
anything runs or is pushed, on a real copy of this repository with real DVC remotes (an HTTP one on loopback
that serves reads only, a closed port). The whole job, against a server, runs in tests/test_team_e2e.py."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import retrain
from http_remote import refusing_remote
from smoke_repo import smoke_repo


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict]:
    """A committed copy of this repository (smoke params; nothing run) and the environment to run in it."""
    path, env = smoke_repo(tmp_path_factory.mktemp("retrain"))
    return path, {k: v for k, v in env.items() if not k.startswith("DVC_REMOTE")}


def run_retrain(project: tuple[Path, dict], **env) -> subprocess.CompletedProcess:
    path, base = project
    return subprocess.run(
        [sys.executable, "scripts/retrain.py", "--summary", "summary.md"],
        cwd=path,
        env=base | env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_stopped_before_anything(project: tuple[Path, dict], proc: subprocess.CompletedProcess) -> str:
    """The job failed with one line on stderr, and pulled, ran, pushed and summarised nothing."""
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("retrain: "), proc.stderr
    path = project[0]
    assert not (path / "summary.md").exists()
    assert not (path / "data").exists() and not (path / "models").exists()
    assert "Running stage" not in proc.stdout
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_remote_is_one_line_naming_what_to_set(project):
    line = assert_stopped_before_anything(project, run_retrain(project))
    assert "no DVC remote" in line and "DVC_REMOTE_URL" in line and "dvc remote add -d" in line


def test_an_unreachable_remote_stops_before_anything_runs(project):
    url = f"http://127.0.0.1:{free_port()}/lmpipe"  # nothing listens there
    line = assert_stopped_before_anything(project, run_retrain(project, DVC_REMOTE_URL=url))
    assert url in line and "cannot be written" in line and "nothing was run or pushed" in line
    # The remote was added to .dvc/config.local only: the committed .dvc/config is unchanged.
    assert (
        subprocess.run(
            ["git", "status", "--porcelain", ".dvc"], cwd=project[0], capture_output=True, text=True
        ).stdout
        == ""
    )


def test_a_read_only_remote_stops_before_anything_runs(project, tmp_path):
    with refusing_remote(tmp_path) as base:
        url = f"{base}/lmpipe"
        line = assert_stopped_before_anything(project, run_retrain(project, DVC_REMOTE_URL=url))
    assert url in line and "403" in line and "writable" in line
    assert not any(tmp_path.iterdir())


def test_registry_line_states_the_gate_decision(tmp_path):
    record = {
        "model_name": "lmpipe",
        "aliases": {"candidate": "8", "champion": "2"},
        "decision": {
            "candidate": {"variant": "teacher-int8", "version": "8"},
            "promoted": False,
            "reason": "tasks.book.f1_macro 0.05 of v8 does not beat champion v2's 0.07: champion stays",
        },
    }
    (tmp_path / "register.json").write_text(json.dumps(record))
    line = retrain.registry_line(tmp_path / "register.json")
    assert line.startswith("**Model registry:** `lmpipe` candidate v8 (teacher-int8): not promoted.")
    assert "champion stays" in line and "`candidate` v8, `champion` v2" in line
    assert "has not run" in retrain.registry_line(tmp_path / "absent.json")


def test_summary_never_claims_a_push_that_failed():
    outcome = retrain.Outcome("p1", "storage", "HEAD", stages_run=["register"])
    outcome.failures.append("dvc push to 'storage' failed: 403")
    text = retrain.summary(outcome, "**Model registry:** x", "(no metrics changed against HEAD)", "| table |")
    assert "**Status:** **FAILED**: dvc push to 'storage' failed: 403." in text
    assert "**not pushed**" in text and "pushed; every output" not in text
    assert "**Stages run:** register." in text
    outcome.failures.clear()
    outcome.pushed = True
    assert "pushed; every output is on the remote" in retrain.summary(outcome, "", "", "")


@pytest.mark.parametrize(
    ("output", "line"),
    [
        (
            "a\nERROR: failed to transfer 'x' - 403\nERROR: failed to push data to the cloud - 2 files\n",
            "failed to push data to the cloud - 2 files",
        ),
        ("Running stage 'a':\nboom\n\n", "boom"),
        ("", "no output"),
    ],
)
def test_one_line_takes_dvcs_last_error(output, line):
    assert retrain.one_line(output) == line
