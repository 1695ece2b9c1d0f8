"""The commands README.md documents, taken from its ```bash and ```python blocks, as the tests run them.

The end-to-end test runs every one of them on its finished smoke run, except those in SKIP (each with the
reason it cannot run there); tests/test_readme_commands.py keeps SKIP and the README in step.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"

# Documented commands a test cannot run on the smoke run, by a fragment of their text.
SKIP = {
    "make train": "the full default pipeline (about 30 minutes); the smoke run is its `dvc repro` at smoke scale",
    "make test": "the test suite that is running this test",
    "dvc exp run": "trains the whole pipeline again; the end-to-end test runs `dvc exp run -S experiment=smoke ...`",
    "lmpipe serve": "a server that runs until stopped (tests/test_serve*.py cover it)",
    "curl ": "talks to the server above",
    "make server": "starts PostgreSQL and mlflow server until stopped; tests/test_team_e2e.py starts the same stack "
    "(scripts/mlflow_server.py) in a temporary folder",
    "make retrain": (
        "the retraining job against a team's remote and server; tests/test_team_e2e.py runs its script on a"
        " clone of the smoke run against a folder remote and the PostgreSQL-backed server"
    ),
    "OpenAI(base_url=": "a client of the server above (tests/test_serve_openai_client.py makes the same calls)",
}


@dataclass(frozen=True)
class Command:
    language: str
    """`bash` (one shell command, continuation lines joined) or `python` (a whole block)."""
    text: str

    @property
    def skipped(self) -> str | None:
        """Why it is not run, or None."""
        return next((why for fragment, why in SKIP.items() if fragment in self.text), None)


def readme_commands(readme: Path = README) -> list[Command]:
    """Every command of the README's bash blocks (a command spans lines while a quote or a `\\` is open), and
    every python block whole."""
    commands = []
    for language, body in re.findall(
        r"^```(bash|python)\n(.*?)^```", readme.read_text(encoding="utf-8"), re.M | re.S
    ):
        if language == "python":
            commands.append(Command("python", body))
            continue
        pending = ""
        for line in body.splitlines():
            pending += ("\n" if pending else "") + line
            if pending.endswith("\\"):
                continue
            try:
                words = shlex.split(pending, comments=True)
            except ValueError:  # an open quote: the command goes on
                continue
            if words:
                commands.append(Command("bash", pending))
            pending = ""
    return commands
