"""lmpipe.stage.run_stage: config in, exit status and one clear stderr line out."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lmpipe import config
from lmpipe.errors import LmpipeError
from lmpipe.stage import run_stage, stage_scripts, warn_if_bf16_is_emulated

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SECTIONS = ("seed", "model")
STAGES = stage_scripts(ROOT / "pipelines")
# What `--help` must not import: each of these stacks takes seconds, and the help must answer in under 2 s.
HEAVY = ("lightning", "torch", "mlflow", "great_expectations", "onnxruntime")


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A working directory with copies of conf/ and pipelines/ and no params.yaml: stages compose conf/."""
    shutil.copytree(CONF, tmp_path / "conf")
    shutil.copytree(ROOT / "pipelines", tmp_path / "pipelines", ignore=shutil.ignore_patterns("__pycache__"))
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
    text = config.params_yaml([]).replace("\nmodel:\n", "\nmodel:\n  n_layr: 3\n")  # the top-level section
    (repo / "params.yaml").write_text(text, encoding="utf-8")
    body = Recorder()
    assert run_stage("pretrain", SECTIONS, body, argv=[]) == 2
    assert stderr_lines(capsys) == [
        "pretrain: error: params.yaml: unknown key 'model.n_layr' for lmpipe.model_config.GPTConfig"
        " (did you mean: n_embd, n_head, n_layer?)"
    ]
    assert body.calls == []


def readers(section: str) -> str:
    return ", ".join(stage.name for stage in STAGES.values() if section in stage.sections)


@pytest.mark.parametrize(
    ("override", "section"),
    [("tokenizer.vocab_size=3", "tokenizer"), ("+tokenizer.extra=3", "tokenizer"), ("data=text", "data")],
)
def test_override_of_a_section_the_stage_does_not_read_names_the_stages_that_do(
    repo, capsys, override, section
):
    body = Recorder()
    for argv in ([override], ["--help", override]):
        assert run_stage("demo", SECTIONS, body, argv=argv) == 2
        assert stderr_lines(capsys) == [
            f"demo: error: override '{override}': stage demo does not read section '{section}'"
            f" (read by: {readers(section)})"
        ]
    assert body.calls == [] and readers(section)


def test_override_of_a_section_no_stage_reads(repo, capsys):
    assert run_stage("demo", SECTIONS, Recorder(), argv=["model.n_layer=3", "+nosuch.key=1"]) == 2
    assert stderr_lines(capsys) == [
        "demo: error: override '+nosuch.key=1': stage demo does not read section 'nosuch' (no stage reads it)"
    ]


@pytest.mark.parametrize(
    "overrides",
    [["experiment=smoke"], ["model=gpt-tiny", "model.n_layer=3"], ["hydra.job.name=x"], ["++seed=3"]],
)
def test_presets_hydra_settings_and_read_sections_may_be_overridden(repo, overrides):
    # experiment=smoke sets many sections, but it is a preset for the whole config (package _global_).
    assert run_stage("demo", SECTIONS, Recorder(), argv=overrides) == 0


def test_the_stage_sees_only_the_sections_it_reads(repo):
    body = Recorder()
    assert run_stage("demo", SECTIONS, body, argv=["seed=2"]) == 0
    assert list(body.calls[0]) == list(SECTIONS)


def test_stage_scripts_reads_names_and_sections_without_importing(tmp_path):
    (tmp_path / "a.py").write_text(
        'import no_such_module\nSECTIONS = ("seed", "x")\nraise SystemExit(run_stage("alpha", SECTIONS, main))\n'
    )
    (tmp_path / "helper.py").write_text("SECTIONS = ()\n")  # no run_stage call: not a stage
    assert stage_scripts(tmp_path) == {
        "alpha": type(STAGES["prepare"])("alpha", tmp_path / "a.py", ("seed", "x"))
    }
    assert "tokenize" in STAGES and STAGES["tokenize"].path.name == "tokenize_corpus.py"


def script_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LMPIPE_", "DVC_EXP"))}
    env.update(GX_ANALYTICS_ENABLED="false", PYTHONDONTWRITEBYTECODE="1")
    return env


HELP_PROBE = """
import runpy, sys
heavy = set(sys.argv.pop(1).split(","))
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exc:
    assert not exc.code, f"exit status {exc.code}"
print(" ".join(sorted({name.partition(".")[0] for name in sys.modules} & heavy)))
"""


@pytest.mark.parametrize(
    ("stage", "overrides"),
    [(name, []) for name in STAGES] + [("pretrain", ["experiment=smoke"])],
    ids=[*STAGES, "pretrain-composed"],
)
def test_help_does_not_import_heavy_stacks(stage, overrides):
    # Checked by what is imported, not by timing (this machine is shared): these stacks take seconds each.
    script = str(STAGES[stage].path.relative_to(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", HELP_PROBE, ",".join(HEAVY), script, "--help", *overrides],
        cwd=ROOT,
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: python pipelines/{Path(script).name} ")
    assert proc.stdout.splitlines()[-1] == "", f"--help of {stage} imports {proc.stdout.splitlines()[-1]}"


@pytest.mark.parametrize(
    ("target", "modules"),
    [("compare-sft", []), ("compare-replay", ["-m lmpipe.training.replay_compare"])],
)
def test_make_compare_overrides_pass_every_stage_it_runs(tmp_path, target, modules):
    # `make compare-sft` (and compare-replay) hands one OVERRIDES to sft.py and evaluate.py: each must accept the
    # whole command line. A stand-in for .venv/bin runs every `python pipelines/<stage>.py ...` of the recipe
    # with --help (and only logs a `python -m module`).
    fake = tmp_path / "bin"
    fake.mkdir()
    log = tmp_path / "calls"
    (fake / "python").write_text(
        f'#!/bin/sh\nif [ "$1" = -m ]; then echo "-m $2" >> {log}; exit 0; fi\necho "$1" >> {log}\n'
        f'script="$1"; shift\nexec {sys.executable} "$script" --help "$@" >/dev/null\n'
    )
    (fake / "python").chmod(0o755)
    (fake / ".installed").touch()  # newer than requirements.lock: `setup` has nothing to do
    proc = subprocess.run(
        ["make", "-s", target, f"BIN={fake}", "OVERRIDES=experiment=smoke"],
        cwd=ROOT,
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    calls = set(log.read_text().splitlines())
    assert sorted(calls) == sorted(["pipelines/evaluate.py", "pipelines/sft.py", *modules])


def test_missing_section_returns_2(repo, capsys):
    (repo / "params.yaml").write_text("seed: 1\n", encoding="utf-8")
    assert run_stage("demo", SECTIONS, Recorder(), argv=[]) == 2
    assert stderr_lines(capsys) == ["demo: error: params.yaml: missing section 'model'"]


def test_run_outside_the_repository_root_returns_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no conf/, no params.yaml
    assert run_stage("demo", SECTIONS, Recorder(), argv=["seed=1"]) == 2
    [line] = stderr_lines(capsys)
    assert line.startswith("demo: error: missing ") and line.endswith("(run from the repository root)")


@pytest.mark.parametrize(
    "flags, accelerator, precision, warned",
    [
        ("fpu avx2 fma", "cpu", "bf16-mixed", True),
        ("fpu avx2 avx512f avx512_bf16", "cpu", "bf16-mixed", False),
        ("fpu avx2 amx_bf16 amx_tile", "cpu", "bf16-true", False),
        ("fpu avx2 fma", "cpu", "32-true", False),
        ("fpu avx2 fma", "gpu", "bf16-mixed", False),
    ],
)
def test_bf16_on_a_cpu_without_native_bf16_is_warned_once_in_one_line(
    tmp_path, capsys, flags, accelerator, precision, warned
):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    trainer = OmegaConf.create({"accelerator": accelerator, "precision": precision})
    assert warn_if_bf16_is_emulated("pretrain", trainer, cpuinfo) is warned
    err = capsys.readouterr().err
    assert (err.count("\n") == 1 and "trainer.precision=32-true" in err) if warned else err == ""
