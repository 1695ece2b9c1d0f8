"""The `lmpipe` command line: `lmpipe params` writes and checks params.yaml."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmpipe import cli, config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A working directory with a copy of conf/ and no params.yaml."""
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_params_writes_the_composition(repo, capsys):
    assert cli.main(["params"]) == 0
    written = (repo / "params.yaml").read_text(encoding="utf-8")
    assert written == (ROOT / "params.yaml").read_text(encoding="utf-8")  # same conf/, same text
    assert capsys.readouterr().out == "wrote params.yaml\n"
    assert sorted(p.name for p in repo.iterdir()) == ["conf", "params.yaml"]  # no temp litter


def test_params_with_overrides(repo, capsys):
    assert cli.main(["params", "experiment=smoke", "model.n_layer=3"]) == 0
    text = (repo / "params.yaml").read_text(encoding="utf-8")
    assert text == config.params_yaml(["experiment=smoke", "model.n_layer=3"])
    cfg = config.load([], params_file=repo / "params.yaml")
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.trainer.max_steps) == (3, 64, 30)
    assert capsys.readouterr().out == "wrote params.yaml with experiment=smoke model.n_layer=3\n"


def test_check_passes_when_params_yaml_matches(repo, capsys):
    cli.main(["params"])
    capsys.readouterr()
    before = (repo / "params.yaml").stat().st_mtime_ns
    assert cli.main(["params", "--check"]) == 0
    assert capsys.readouterr().out == "params.yaml matches conf/\n"
    assert (repo / "params.yaml").stat().st_mtime_ns == before  # --check never writes


def test_check_fails_when_conf_changed(repo, capsys):
    cli.main(["params"])
    capsys.readouterr()
    gpt = repo / "conf" / "model" / "gpt-small.yaml"
    gpt.write_text(gpt.read_text(encoding="utf-8").replace("n_layer: 4", "n_layer: 5"), encoding="utf-8")
    assert cli.main(["params", "--check"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert (
        err == "lmpipe params: error: params.yaml differs from the composition of conf/: run 'make params'\n"
    )
    assert "n_layer: 4" in (repo / "params.yaml").read_text(encoding="utf-8")  # left for the user to fix


def test_check_fails_for_other_overrides_and_missing_file(repo, capsys):
    assert cli.main(["params", "--check"]) == 2  # no params.yaml yet
    assert not (repo / "params.yaml").exists()
    cli.main(["params"])
    assert cli.main(["params", "--check", "experiment=smoke"]) == 2
    assert cli.main(["params", "experiment=smoke"]) == 0
    assert cli.main(["params", "--check", "experiment=smoke"]) == 0


def test_bad_override_is_one_line_and_writes_nothing(repo, capsys):
    cli.main(["params"])
    before = (repo / "params.yaml").read_bytes()
    capsys.readouterr()
    assert cli.main(["params", "model.n_layr=3"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    [line] = err.splitlines()
    assert line.startswith("lmpipe params: error: config overrides ['model.n_layr=3']: ")
    assert "'model.n_layr'" in line
    assert (repo / "params.yaml").read_bytes() == before


def test_missing_conf_is_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["params"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("lmpipe params: error: missing ") and "run from the repository root" in line


def test_subcommand_is_required(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([])
    assert exit_.value.code == 2


def test_console_script_checks_params(repo):
    lmpipe = Path(sys.executable).parent / "lmpipe"
    assert lmpipe.exists(), "the lmpipe console script is installed with the package"
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
    ok = subprocess.run([lmpipe, "params", "--check"], capture_output=True, text=True, cwd=repo, timeout=60)
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "params.yaml matches conf/\n", "")
    bad = subprocess.run(
        [lmpipe, "params", "trainer=nope"], capture_output=True, text=True, cwd=repo, timeout=60
    )
    assert bad.returncode == 2 and bad.stdout == ""
    [line] = bad.stderr.splitlines()
    assert line.startswith("lmpipe params: error: ") and "trainer/nope" in line
