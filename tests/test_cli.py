"""The `lmpipe` command line: `params` writes and checks params.yaml; `generate` and `serve` run a model."""

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


# --- `lmpipe generate` and `lmpipe serve` -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """(export directory, engine) of a tiny random GPT exported to ONNX once for the module."""
    import torch

    from lmpipe.atomic import write_json
    from lmpipe.chat import tokenizer_config
    from lmpipe.export import ExportConfig, export_onnx
    from lmpipe.inference.engine import OrtEngine
    from lmpipe.model import GPT, GPTConfig, save_checkpoint
    from lmpipe.tokenizer import TOKENIZER_CONFIG_FILE, TokenizerConfig, save_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("cli")
    model_dir = root / "model"
    model_dir.mkdir()
    texts = ["In the beginning God created the heaven and the earth.", "And the earth was without form."] * 3
    tok = train_tokenizer(texts, TokenizerConfig(kind="bpe", vocab_size=300))
    save_tokenizer(tok, model_dir / "tokenizer.json")
    write_json(model_dir / TOKENIZER_CONFIG_FILE, tokenizer_config())
    cfg = GPTConfig(
        vocab_size=tok.get_vocab_size(), block_size=64, n_layer=1, n_head=2, n_embd=32, dropout=0.0
    )
    model = GPT(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # std 0.3: outputs depend on the context, unlike a freshly initialised model's
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    save_checkpoint(model_dir / "model.pt", model, {"stage": "test"})
    export_onnx(model_dir, root / "onnx", ExportConfig(parity_decode_steps=2), seed=0, variant_name="tiny")
    return root / "onnx", OrtEngine(root / "onnx", threads=1)


def completion_text(engine, prompt: str, max_tokens: int, chat: bool = True, **sampling) -> str:
    from lmpipe.inference.sampling import GenerationParams

    params = GenerationParams(max_new_tokens=max_tokens, **sampling)
    return engine.generate([prompt], params, chat=chat)[0].text


def test_generate_prints_the_chat_completion(tiny_export, capsys):
    export_dir, engine = tiny_export
    argv = ["generate", "--model", str(export_dir), "--max-tokens", "12", "--threads", "1"]
    assert cli.main([*argv, "In the beginning"]) == 0
    expected = completion_text(engine, "In the beginning", 12)
    assert len(expected) > 5
    assert capsys.readouterr() == (expected + "\n", "")
    assert cli.main([*argv, "--raw", "In the beginning"]) == 0
    raw = completion_text(engine, "In the beginning", 12, chat=False)
    assert raw != expected and capsys.readouterr().out == raw + "\n"


def test_generate_stream_prints_the_same_text(tiny_export, capsys):
    export_dir, engine = tiny_export
    argv = ["generate", "--model", str(export_dir), "--max-tokens", "20", "God", "And the earth"]
    assert cli.main(argv) == 0
    whole = capsys.readouterr().out
    god, earth = completion_text(engine, "God", 20), completion_text(engine, "And the earth", 20)
    assert whole == f"==> God <==\n{god}\n\n==> And the earth <==\n{earth}\n"
    assert cli.main([*argv, "--stream"]) == 0
    assert capsys.readouterr().out == whole


def test_generate_passes_sampling_options(tiny_export, capsys):
    export_dir, engine = tiny_export
    options = ["--temperature", "0.9", "--top-k", "20", "--top-p", "0.8", "--seed", "3", "--max-tokens", "16"]
    assert cli.main(["generate", "--model", str(export_dir), *options, "God"]) == 0
    expected = completion_text(engine, "God", 16, temperature=0.9, top_k=20, top_p=0.8, seed=3)
    assert capsys.readouterr().out == expected + "\n"
    full = completion_text(engine, "God", 16)
    stop = full[4:6]
    assert (
        cli.main(["generate", "--model", str(export_dir), "--max-tokens", "16", "--stop", stop, "God"]) == 0
    )
    assert capsys.readouterr().out == full[: full.index(stop)] + "\n"


def test_generate_bad_options_are_one_line(tiny_export, capsys):
    export_dir, _ = tiny_export
    assert cli.main(["generate", "--model", str(export_dir), "--top-p", "2", "God"]) == 2
    out, err = capsys.readouterr()
    assert (out, err) == ("", "lmpipe generate: error: top_p=2.0: expected a value less than or equal to 1\n")
    assert cli.main(["generate", "--model", str(export_dir), "--max-tokens", "64", "God"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert "+ max_new_tokens=64 exceeds block_size=64" in line


def test_generate_without_the_model_says_how_to_build_it(tmp_path):
    lmpipe = Path(sys.executable).parent / "lmpipe"
    run = subprocess.run(
        [lmpipe, "generate", "hello"], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert (run.returncode, run.stdout) == (2, "")
    [line] = run.stderr.splitlines()
    assert line.startswith("lmpipe generate: error: missing model directory models/onnx/teacher-int8: ")
    assert "dvc repro export" in line and "dvc repro quantize" in line


def test_serve_builds_its_config_from_the_options(monkeypatch, capsys):
    from lmpipe import serve

    served = []
    monkeypatch.setattr(serve, "serve", served.append)
    argv = ["serve", "--model", "models:/teacher@champion", "--port", "9001", "--host", "0.0.0.0"]
    options = ["--threads", "2", "--max-tokens-limit", "64", "--max-batch", "4"]
    assert cli.main([*argv, *options, "--classifier", "models:/lmpipe-classifier@champion"]) == 0
    assert served == [
        serve.ServeConfig(
            model="models:/teacher@champion",
            host="0.0.0.0",
            port=9001,
            threads=2,
            max_tokens_limit=64,
            max_batch=4,
            classifier="models:/lmpipe-classifier@champion",
        )
    ]
    assert cli.main(["serve"]) == 0
    assert served[-1] == serve.ServeConfig() and serve.ServeConfig().model == cli.DEFAULT_MODEL
    assert serve.ServeConfig().classifier == ""  # no /v1/classify unless asked for
    assert cli.main(["serve", "--port", "0"]) == 2
    assert (
        capsys.readouterr().err
        == "lmpipe serve: error: serve.port=0: expected a value greater than or equal to 1\n"
    )


def test_serve_takes_the_batching_options_and_the_api_key_from_the_environment(monkeypatch):
    from lmpipe import serve

    served = []
    monkeypatch.setattr(serve, "serve", served.append)
    monkeypatch.setenv(cli.API_KEY_ENV, "from-env")
    options = [
        "--max-running",
        "4",
        "--max-queue",
        "9",
        "--request-timeout",
        "2.5",
        "--shutdown-timeout",
        "0",
    ]
    assert cli.main(["serve", *options, "--max-body-bytes", "5000"]) == 0
    assert cli.main(["serve", "--api-key", "given"]) == 0
    monkeypatch.delenv(cli.API_KEY_ENV)
    assert cli.main(["serve"]) == 0
    assert served == [
        serve.ServeConfig(
            max_running=4,
            max_queue=9,
            request_timeout=2.5,
            shutdown_timeout=0,
            max_body_bytes=5000,
            api_key="from-env",
        ),
        serve.ServeConfig(api_key="given"),
        serve.ServeConfig(api_key=""),
    ]
    assert "from-env" not in repr(served[0])  # the key stays out of logs and tracebacks


def test_cli_start_up_imports_no_inference_or_web_stack():
    code = (
        "import sys, lmpipe.cli; "
        "print([m for m in ('onnxruntime', 'fastapi', 'uvicorn', 'pydantic', 'torch', 'lmpipe.serve') "
        "if m in sys.modules])"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (run.returncode, run.stdout) == (0, "[]\n")
