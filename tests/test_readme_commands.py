"""The README's commands are found, and each is either run by the end-to-end test or skipped for a stated reason
(tests/test_pipeline_e2e.py::test_readme_commands_run_on_the_smoke_run runs them)."""

from readme_commands import SKIP, Command, readme_commands


def test_readme_commands_are_found_whole():
    commands = readme_commands()
    texts = [c.text for c in commands]
    assert any(t.startswith(".venv/bin/python pipelines/pretrain.py --help") for t in texts)
    # A quoted argument over two lines stays one command; so does a `\` continuation.
    generate = next(t for t in texts if t.startswith('.venv/bin/lmpipe generate "Which book'))
    assert generate.count("\n") == 1 and generate.endswith('earth."')
    assert all(c.language in ("bash", "python") for c in commands)
    assert any(c.language == "python" and "mlflow.pyfunc.load_model" in c.text for c in commands)


def test_every_skip_reason_still_matches_a_documented_command():
    commands = readme_commands()
    stale = [fragment for fragment in SKIP if not any(fragment in c.text for c in commands)]
    assert stale == [], "SKIP names commands the README no longer documents"


def test_most_commands_run():
    commands = readme_commands()
    run = [c for c in commands if c.skipped is None]
    assert len(run) >= len(commands) / 2, [c.text for c in commands if c.skipped]


def test_continuations_and_comments(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(
        "text\n```bash\nmake a   # first\nlmpipe x \\\n  --y 1\necho 'two\nlines'\n\n# only a comment\n```\n"
        "```python\nprint(1)\n```\n```yaml\nnot: run\n```\n",
        encoding="utf-8",
    )
    assert readme_commands(readme) == [
        Command("bash", "make a   # first"),
        Command("bash", "lmpipe x \\\n  --y 1"),
        Command("bash", "echo 'two\nlines'"),
        Command("python", "print(1)\n"),
    ]
