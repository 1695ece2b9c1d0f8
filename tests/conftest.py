"""Shared fixtures: a tiny token-shard directory and a composed config shrunk for fast training tests."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from pydoc_data.topics import topics

import pytest
from omegaconf import DictConfig

from lmpipe import config
from lmpipe.tokenizer import TokenizerConfig, train_tokenizer, write_shards

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
"""The repository's Hydra config tree (tests compose it wherever pytest runs from)."""

# The Python docs topics: varied English prose and code, in the standard library, no download needed.
TOPIC_TEXTS = [topics[key] for key in sorted(topics)]


def write_tiny_shards(out_dir: Path) -> Path:
    """Char-tokenized shards of a few docs topics: ~6.5k train tokens (13 batches of 8 x 64, so epochs pass
    within a few dozen steps), ~3k val and ~1k test tokens. Well under a second."""
    tok = train_tokenizer(TOPIC_TEXTS, TokenizerConfig(kind="char", vocab_size=512))
    splits = {"train": TOPIC_TEXTS[2:5], "val": TOPIC_TEXTS[7:10], "test": TOPIC_TEXTS[10:13]}
    write_shards(out_dir, splits, tok, show_progress=False)
    return out_dir


def tiny_override_list(root: Path, tokens: Path, mlflow_db: Path) -> list[str]:
    """Hydra overrides for the smoke experiment on `tokens`, every output under `root`, MLflow in `mlflow_db`."""
    return [
        "experiment=smoke",
        f"paths.tokens={tokens}",
        f"paths.prepared={root / 'prepared'}",
        f"paths.models={root / 'models'}",
        f"paths.checkpoints={root / 'checkpoints'}",
        f"paths.metrics={root / 'metrics'}",
        f"paths.plots={root / 'plots'}",
        f"logger.tracking_uri=sqlite:///{mlflow_db}",
        f"logger.artifact_location={mlflow_db.parent / 'mlartifacts'}",
        "trainer.enable_progress_bar=false",
        "pretrain.sample_prompts=[def]",
    ]


@pytest.fixture(scope="session")
def tiny_tokens(tmp_path_factory) -> Path:
    """Session-wide read-only shard directory (see `write_tiny_shards`)."""
    return write_tiny_shards(tmp_path_factory.mktemp("shards") / "tokens")


@pytest.fixture(scope="session")
def mlflow_template_db(tmp_path_factory) -> Path:
    """An empty MLflow sqlite store with its schema in place: creating one takes seconds, copying it does not."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "template.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def fresh_mlflow_db(template: Path, target: Path) -> Path:
    """Copy the template store to `target` (once), for a test's own MLflow runs."""
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, target)
    return target


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Run torch on one thread: the models here are so small that a second thread only adds synchronisation,
    which turns into a many-fold slowdown when another process keeps the cores busy."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def conf_dir() -> Path:
    return CONF_DIR


@pytest.fixture
def tiny_overrides(
    tmp_path, tiny_tokens, mlflow_template_db, monkeypatch
) -> Iterator[Callable[..., list[str]]]:
    """`tiny_overrides(root=tmp_path)`: Hydra overrides for the smoke experiment on `tiny_tokens`, with every
    output under `root` (see `tiny_override_list`).

    All runs of a test log to one MLflow store, `<tmp_path>/mlruns.db`. MLFLOW_TRACKING_URI would win over
    it, so it is unset; and since MLflow itself exports that variable whenever a tracking URI is set (Lightning's
    logger does so), it is removed again afterwards so that no later test inherits this test's store. The
    working directory is tmp_path, so that nothing written by relative path lands in the repository.
    """
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    db = fresh_mlflow_db(mlflow_template_db, tmp_path / "mlruns.db")

    def make(root: Path = tmp_path) -> list[str]:
        return tiny_override_list(root, tiny_tokens, db)

    yield make
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture
def tiny_config(tiny_overrides) -> Callable[..., DictConfig]:
    """`tiny_config(*overrides, root=tmp_path)`: the composed config of `tiny_overrides` plus `overrides`."""

    def make(*overrides: str, root: Path | None = None) -> DictConfig:
        base = tiny_overrides() if root is None else tiny_overrides(root)
        return config.compose([*base, *overrides], conf_dir=CONF_DIR)

    return make


@pytest.fixture(scope="session")
def onnx_classifier(tiny_tokens, tmp_path_factory):
    """(the tiny encoder classifier of tiny_models, its ONNX directory): exported once for the session (an
    export takes seconds); the directory is read-only."""
    from tiny_models import tiny_encoder_classifier

    from lmpipe.encoder.onnx import export_classifier

    classifier = tiny_encoder_classifier(tiny_tokens)
    out = tmp_path_factory.mktemp("encoder-onnx") / "onnx"
    export_classifier(classifier, out)
    return classifier, out


@pytest.fixture(scope="session")
def onnx_gpt(tmp_path_factory) -> Path:
    """The ONNX export directory of tiny_models' tiny GPT (block_size 64, model name "tiny"): exported once for
    the session (an export takes seconds); read-only."""
    from tiny_models import export_tiny_model

    from lmpipe.export import ExportConfig

    root = tmp_path_factory.mktemp("gpt-onnx")
    export_tiny_model(root, root / "onnx", ExportConfig(parity_decode_steps=2), variant_name="tiny")
    return root / "onnx"


@pytest.fixture(scope="session")
def served_gpt(onnx_gpt, tmp_path_factory):
    """A real `lmpipe serve` of `onnx_gpt` with the default limits (live_server.LiveServer), for the session."""
    from live_server import lmpipe_serve

    with lmpipe_serve(onnx_gpt, tmp_path_factory.mktemp("served-gpt") / "serve.log") as server:
        yield server


@pytest.fixture(scope="module")
def chromium_browser():
    """Headless Debian Chromium under Playwright, for one test module (see tests/browser.py: skips without a
    local chromium, fails under CI). Not for the session: Playwright's sync API keeps an asyncio loop running
    in the main thread while it is open, and every later test calling asyncio.run() would fail."""
    from browser import chromium

    with chromium() as browser:
        yield browser


@pytest.fixture
def chromium_page(chromium_browser):
    """A fresh page in its own browser context (no cookies or storage shared between tests)."""
    context = chromium_browser.new_context()
    try:
        yield context.new_page()
    finally:
        context.close()


@pytest.fixture(scope="module")
def team_server(tmp_path_factory):
    """PostgreSQL and `mlflow server` on it with proxied artifacts, for one test module (tests/team_stack.py:
    skips without a PostgreSQL server binary, fails under CI); stopped by PID at the module's end."""
    from team_stack import team_stack

    with team_stack(tmp_path_factory.mktemp("team-server") / "artifacts") as server:
        yield server
