"""lmpipe.stage.run_stage: config in, exit status and one clear stderr line out."""

import shutil
from pathlib import Path

import pytest

from lmpipe import config
from lmpipe.errors import LmpipeError
from lmpipe.stage import run_stage

CONF = Path(__file__).resolve().parents[1] / "conf"
SECTIONS = ("seed", "model")


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A working directory with a copy of conf/ and no params.yaml: stages compose conf/."""
    shutil.copytree(CONF, tmp_path / "conf")
    monkeypatch.chdir(tmp_path)
    return tmp_path


class Recorder:
    """A stage body that records the configs it was called with."""

    def __init__(self, error: Exception | None = None):
        self.calls = []
        self.error = error

    def __call__(self, cfg):
        self.calls.append(cfg)
        if self.error is not None:
            raise self.error


def stderr_lines(capsys) -> list[str]:
    return capsys.readouterr().err.splitlines()


def test_success_returns_0_and_passes_the_composed_config(repo, capsys):
    body = Recorder()
    assert run_stage("demo", SECTIONS, body, argv=["model.n_layer=6", "seed=5"]) == 0
    [cfg] = body.calls
    assert (cfg.seed, cfg.model.n_layer, cfg.model.n_head) == (5, 6, 4)
    assert capsys.readouterr().err == ""


def test_no_overrides_reads_params_yaml(repo, capsys):
    (repo / "params.yaml").write_text(config.params_yaml(["seed=99"]), encoding="utf-8")
    body = Recorder()
    assert run_stage("demo", SECTIONS, body, argv=[]) == 0
    assert body.calls[0].seed == 99


def test_lmpipe_error_is_one_line_on_stderr_with_status_2(repo, capsys):
    body = Recorder(LmpipeError("data/x.txt: file is empty, expected UTF-8 text"))
    assert run_stage("prepare", SECTIONS, body, argv=["seed=1"]) == 2
    out, err = capsys.readouterr()
    assert err == "prepare: error: data/x.txt: file is empty, expected UTF-8 text\n"
    assert out == ""
    assert len(body.calls) == 1


def test_multi_line_error_message_is_collapsed_to_one_line(repo, capsys):
    body = Recorder(LmpipeError("tokenizer t.json is not valid:\n  line 3\n  column 7"))
    assert run_stage("tokenize", SECTIONS, body, argv=["seed=1"]) == 2
    assert stderr_lines(capsys) == ["tokenize: error: tokenizer t.json is not valid: line 3 column 7"]


def test_other_exceptions_are_not_swallowed(repo):
    # A bug (not a user error) keeps its traceback.
    with pytest.raises(ZeroDivisionError):
        run_stage("demo", SECTIONS, Recorder(ZeroDivisionError("bug")), argv=["seed=1"])


def test_keyboard_interrupt_returns_130(repo, capsys):
    assert run_stage("demo", SECTIONS, Recorder(KeyboardInterrupt()), argv=["seed=1"]) == 130
    assert stderr_lines(capsys) == ["demo: interrupted"]


def test_help_prints_usage_values_and_field_docs(repo, capsys):
    body = Recorder()
    assert run_stage("pretrain", SECTIONS, body, argv=["--help"]) == 0
    out, err = capsys.readouterr()
    assert body.calls == [] and err == ""
    assert out.startswith("usage: python pipelines/pretrain.py [--help] [OVERRIDE ...]")
    lines = out.splitlines()
    assert "seed: 1337" in lines
    assert "  model.n_layer=4  # Number of transformer blocks." in lines
    assert "  model.n_head=4  # Number of attention heads per block." in lines


def test_help_shows_overridden_values(repo, capsys):
    assert run_stage("pretrain", SECTIONS, Recorder(), argv=["-h", "model=gpt-tiny", "model.n_layer=3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "  model.n_layer=3  # Number of transformer blocks." in lines
    assert "  model.n_embd=64  # Width of the residual stream (must be divisible by n_head)." in lines


def test_help_with_a_bad_override_is_an_error(repo, capsys):
    assert run_stage("pretrain", SECTIONS, Recorder(), argv=["--help", "model.n_layr=3"]) == 2
    [line] = stderr_lines(capsys)
    assert line.startswith("pretrain: error: ") and "model.n_layr" in line


@pytest.mark.parametrize("override", ["model.n_layr=3", "+model.n_layr=3"])
def test_unknown_key_in_argv_returns_2_naming_the_key(repo, capsys, override):
    body = Recorder()
    assert run_stage("pretrain", SECTIONS, body, argv=[override]) == 2
    [line] = stderr_lines(capsys)
    assert line.startswith("pretrain: error: ")
    assert "'model.n_layr'" in line
    assert body.calls == []


def test_unknown_key_in_params_yaml_returns_2_naming_file_and_key(repo, capsys):
    text = config.params_yaml([]).replace("  n_layer: 4\n", "  n_layer: 4\n  n_layr: 3\n")
    (repo / "params.yaml").write_text(text, encoding="utf-8")
    body = Recorder()
    assert run_stage("pretrain", SECTIONS, body, argv=[]) == 2
    assert stderr_lines(capsys) == [
        "pretrain: error: params.yaml: unknown key 'model.n_layr' for lmpipe.model.GPTConfig"
        " (did you mean: n_embd, n_head, n_layer?)"
    ]
    assert body.calls == []


def test_unknown_key_outside_the_stage_sections_is_not_this_stage_s_concern(repo, capsys):
    # Each stage checks only the sections it reads (dvc.yaml tracks only those for it).
    assert run_stage("demo", ("seed",), Recorder(), argv=["+model.n_layr=3"]) == 0


def test_missing_section_returns_2(repo, capsys):
    (repo / "params.yaml").write_text("seed: 1\n", encoding="utf-8")
    assert run_stage("demo", SECTIONS, Recorder(), argv=[]) == 2
    assert stderr_lines(capsys) == ["demo: error: params.yaml: missing section 'model'"]


def test_run_outside_the_repository_root_returns_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no conf/, no params.yaml
    assert run_stage("demo", SECTIONS, Recorder(), argv=["seed=1"]) == 2
    [line] = stderr_lines(capsys)
    assert line.startswith("demo: error: missing ") and line.endswith("(run from the repository root)")
