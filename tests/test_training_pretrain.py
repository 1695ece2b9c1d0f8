import json
import os
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
from mlflow import MlflowClient

from lmpipe import config
from lmpipe.tokenizer import read_meta
from lmpipe.training import core, datamodules
from lmpipe.training import pretrain as pretrain_module
from lmpipe.training.pretrain import pretrain

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# smoke experiment: gpt-tiny with its block cut to 64 (below), batch 8; the tiny train shard is 13 such batches per
# epoch, so the resume tests below can stop mid-epoch.
BATCH, BLOCK, EPOCH = 8, 64, 13


@pytest.fixture
def tiny_config(tiny_config):
    """The shared tiny config with `model.block_size=BLOCK`, so that the token and epoch arithmetic here holds
    whatever block size gpt-tiny has (it is sized for the instruction prompts of the sft tests)."""

    def make(*overrides: str, root=None):
        return tiny_config(f"model.block_size={BLOCK}", *overrides, root=root)

    return make


class Killed(Exception):
    """Stands in for the process dying (Lightning turns a KeyboardInterrupt into sys.exit)."""


class KillAt(L.Callback):
    """Dies when `step` optimizer steps are done, before the next one starts."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Killed(f"killed at step {self.step}")


class StepLog(L.Callback):
    """The global step at the start of every training batch this process ran."""

    def __init__(self):
        self.steps: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append(trainer.global_step)


@pytest.fixture
def extra_callbacks(monkeypatch):
    """`extra_callbacks(*callbacks)`: pretrain() runs these beside its own (in place of the progress lines)."""

    def use(*callbacks: L.Callback) -> None:
        monkeypatch.setattr(core, "progress_callbacks", lambda every: (list(callbacks), False))

    return use


def test_a_short_run_reports_steps_tokens_curves_and_samples(tiny_config, tmp_path):
    cfg = tiny_config("trainer.max_steps=50", "trainer.val_check_interval=10", "trainer.log_every_n_steps=5")
    result = pretrain(cfg, run=None)

    m = result.metrics
    assert m["steps"] == 50 and m["world_size"] == 1 and m["resumed"] is False
    assert m["tokens_seen"] == 50 * BATCH * BLOCK
    assert m["parameters"] == result.model.num_parameters()
    assert m["tokens_per_sec"] > 0 and 0 < m["train_seconds"]
    assert [step for step, _ in result.curves["train_loss"]] == list(range(5, 51, 5))
    # Validation every 10 steps straight across the epoch boundaries (at 13, 26, 39).
    assert [step for step, _ in result.curves["val_loss"]] == [10, 20, 30, 40, 50]
    train = [loss for _, loss in result.curves["train_loss"]]
    assert train[-1] < train[0] - 0.5, train
    assert result.curves["val_loss"][-1][1] < result.curves["val_loss"][0][1] - 0.3, result.curves["val_loss"]
    assert m["fit"]["final_val_loss"] == result.curves["val_loss"][-1][1]
    assert m["fit"]["verdict"] in {"overfitting", "underfitting", "converged"}

    assert len(result.samples) == cfg.pretrain.num_samples == 1
    assert result.samples[0]["prompt"] == "def" and isinstance(result.samples[0]["completion"], str)
    assert not result.model.training

    ckpt_dir = tmp_path / "checkpoints" / "pretrain"
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=False)["global_step"] == 50
    assert json.loads((ckpt_dir / "fingerprint.json").read_text())["fingerprint"] == fingerprint(cfg)
    # The training curve went to this test's own MLflow store.
    client = MlflowClient(cfg.logger.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("lmpipe").experiment_id])
    logged = client.get_metric_history(run.info.run_id, "train_loss")
    assert len(logged) == 10 and logged[-1].value == pytest.approx(train[-1])


def test_logging_only_on_logging_steps_keeps_every_curve_and_metric(tiny_config, tmp_path):
    def run(sparse: bool):
        root = tmp_path / str(sparse)
        cfg = tiny_config(
            "trainer.max_steps=12",
            "trainer.log_every_n_steps=4",
            "trainer.val_check_interval=6",
            f"perf.sparse_logging={sparse}",
            root=root,
        )
        result = pretrain(cfg, run=None)
        client = MlflowClient(cfg.logger.tracking_uri)
        experiment = client.get_experiment_by_name("lmpipe").experiment_id
        (logged,) = client.search_runs([experiment], order_by=["attributes.start_time DESC"], max_results=1)
        history = {
            key: [(m.step, m.value) for m in client.get_metric_history(logged.info.run_id, key)]
            for key in ("train_loss", "lr", "val_loss")
        }
        return result, history

    (dense, dense_logged), (sparse, sparse_logged) = run(False), run(True)
    assert sparse.curves == dense.curves and [s for s, _ in sparse.curves["train_loss"]] == [4, 8, 12]
    assert sparse_logged == dense_logged and len(sparse_logged["train_loss"]) == 3
    timing = ("train_seconds", "tokens_per_sec")
    assert {k: v for k, v in sparse.metrics.items() if k not in timing} == {
        k: v for k, v in dense.metrics.items() if k not in timing
    }


RESUMABLE = (
    "trainer.max_steps=20",
    "trainer.val_check_interval=5",
    "trainer.log_every_n_steps=5",
    "pretrain.checkpoint_every_n_steps=5",
    "model.dropout=0.1",  # so that resuming must restore the RNG too
)


# The smoke experiment trains eagerly; the default run compiles the loss and uses the fused AdamW.
PERF_DEFAULTS = ("perf.compile=true", "perf.optimizer_kernel=fused")


@pytest.mark.parametrize("perf", [(), PERF_DEFAULTS], ids=["eager", "compiled-fused"])
def test_resume_after_interruption_continues_exactly(tiny_config, tmp_path, extra_callbacks, perf):
    full = pretrain(tiny_config(*RESUMABLE, *perf, root=tmp_path / "full"))

    # Killed 3 steps after the checkpoint of step 10, in the first epoch; the resumed run crosses into the next.
    extra_callbacks(KillAt(13))
    with pytest.raises(Killed):
        pretrain(tiny_config(*RESUMABLE, *perf, root=tmp_path / "killed"))
    ckpt_dir = tmp_path / "killed" / "checkpoints" / "pretrain"
    saved_step = torch.load(ckpt_dir / "last.ckpt", weights_only=False)["global_step"]
    assert saved_step == 10 < EPOCH

    steps = StepLog()
    extra_callbacks(steps)
    resumed = pretrain(tiny_config(*RESUMABLE, *perf, root=tmp_path / "killed"))
    assert resumed.metrics["resumed"] is True
    assert steps.steps == list(range(saved_step, 20))
    assert resumed.metrics["steps"] == 20
    assert resumed.metrics["tokens_seen"] == full.metrics["tokens_seen"]
    full_weights, resumed_weights = full.model.state_dict(), resumed.model.state_dict()
    assert full_weights.keys() == resumed_weights.keys()
    for name, weight in full_weights.items():
        assert torch.equal(resumed_weights[name], weight), name
    assert resumed.curves["train_loss"] == full.curves["train_loss"]
    # The validation of step 10 ran after that step's checkpoint was written and Lightning does not repeat it
    # on resume, so that one point is missing from the resumed history; every other point is identical.
    assert resumed.curves["val_loss"] == [
        point for point in full.curves["val_loss"] if point[0] != saved_step
    ]
    assert resumed.samples == full.samples
    # Lightning's own epoch count agrees too (it ends an epoch after len(train loader) batches of it).
    full_ckpt, resumed_ckpt = (
        torch.load(root / "checkpoints" / "pretrain" / "last.ckpt", weights_only=False)
        for root in (tmp_path / "full", tmp_path / "killed")
    )
    assert resumed_ckpt["epoch"] == full_ckpt["epoch"]
    assert resumed_ckpt["global_step"] == full_ckpt["global_step"] == 20

    # Another seed is another experiment: the stale checkpoints are cleared and training starts from step 0.
    steps = StepLog()
    extra_callbacks(steps)
    reseeded = pretrain(tiny_config(*RESUMABLE, "seed=7", root=tmp_path / "killed"))
    assert reseeded.metrics["resumed"] is False
    assert steps.steps == list(range(20))
    assert not torch.equal(reseeded.model.wte.weight, full.model.wte.weight)


def fingerprint(cfg, meta: dict | None = None) -> str:
    """The fingerprint pretrain() checks for `cfg` (its plan, captured in place of training), with `meta` in
    place of the token shards' if given."""
    plans = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pretrain_module, "fit", lambda plan, cfg, run: plans.append(plan))
        if meta is not None:
            patch.setattr(pretrain_module, "read_meta", lambda _: meta)
        assert pretrain(cfg) is None
    return plans[0].fingerprint(cfg.seed, config.build(cfg.perf))


def test_fingerprint_covers_what_shapes_training_and_nothing_else(tiny_config, tiny_tokens, tmp_path):
    meta = read_meta(tiny_tokens)
    base = fingerprint(tiny_config())
    assert len(base) == 16 and fingerprint(tiny_config()) == base
    for override in (
        "seed=7",
        "model.n_layer=3",
        "model.dropout=0.2",
        "optimizer=sgd",
        "optimizer.lr=0.01",
        "trainer.max_steps=31",
        "trainer.accumulate_grad_batches=2",
        "pretrain.batch_size=4",
        "pretrain.warmup_steps=2",
        "perf.optimizer_kernel=foreach",
        "perf.compile=true",
        "perf.attention=math",
        "perf.attention=explicit",
        "perf.threads=1",
    ):
        assert fingerprint(tiny_config(override)) != base, override
    for override in (
        "trainer.log_every_n_steps=3",
        "trainer.enable_model_summary=true",
        "pretrain.sample_tokens=5",
        "pretrain.sample_prompts=[abc]",
        "logger.experiment_name=other",
        "perf.sparse_logging=false",
    ):
        assert fingerprint(tiny_config(override)) == base, override
    assert fingerprint(tiny_config(root=tmp_path / "elsewhere")) == base  # paths do not count
    assert fingerprint(tiny_config(), {**meta, "tokenizer_sha256": "0" * 64}) != base


def test_the_number_of_samples_does_not_restart_training(tiny_config):
    assert fingerprint(tiny_config("pretrain.num_samples=2")) == fingerprint(tiny_config())


# DDP against one process: the tiny model for DDP_STEPS steps at batch DDP_BATCH on one process, and on two
# DDP processes at DDP_BATCH / 2 each, same seed. Rank r draws its windows from the stream (seed, batch, r): rank 0
# the first half of what one process at the full batch draws, rank 1 others. So
# - exactly: one process fed, per step, the windows of both ranks must reproduce DDP's val curve (gradients
#   averaged over the ranks = the gradient of the whole batch); measured equal to 4 decimals, float sums in
#   another order allow DDP_EXACT;
# - statistically: one process drawing its own windows must land near it. Measured at seeds 1-4 (val loss at
#   steps 20 / 40, `tests` shards, 2 shared cores): one-process runs spread over 0.078 / 0.065 nats between seeds,
#   and DDP minus one process at the same seed was -0.022..+0.107 / -0.005..+0.090 (rank 1's other windows alone
#   moved seed 3 by 0.1: the corpus is 6.5k tokens, some windows are hard). DDP_TOLERANCE is 1.5x the largest.
DDP_STEPS, DDP_BATCH, DDP_EXACT, DDP_TOLERANCE = 40, 16, 2e-3, 0.16


class AllRanksWindows(datamodules.RandomWindows):
    """One process's batch `b` made of what each of RANKS ranks draws at batch_size / RANKS."""

    RANKS = 2
    ONE_RANK = datamodules.RandomWindows

    def batch(self, index):
        part = self.batch_size // self.RANKS
        halves = [
            self.ONE_RANK(
                self.tokens_dir, self.split, self.block_size, part, self.spec._replace(rank=rank)
            ).batch(index)
            for rank in range(self.RANKS)
        ]
        return torch.cat([x for x, _ in halves]), torch.cat([y for _, y in halves])


@pytest.mark.slow
def test_ddp_on_two_processes_learns_what_one_process_learns(
    tiny_config, tiny_overrides, tmp_path, conf_dir, monkeypatch
):
    shape = [f"trainer.max_steps={DDP_STEPS}", "trainer.val_check_interval=10", "trainer.log_every_n_steps=5"]

    # Lightning's DDP launcher re-runs this very command line in a second process (LOCAL_RANK=1).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LMPIPE_", "DVC_EXP"))}
    env.update(LMPIPE_PIPELINE_ID="pytest-ddp", OMP_NUM_THREADS="1")
    command = [
        sys.executable,
        "pipelines/pretrain.py",
        *tiny_overrides(tmp_path / "ddp"),
        f"model.block_size={BLOCK}",
        "trainer=ddp",
        *shape,
        f"pretrain.batch_size={DDP_BATCH // 2}",
    ]
    proc = subprocess.run(command, cwd=conf_dir.parent, env=env, capture_output=True, text=True, timeout=400)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Initializing distributed: GLOBAL_RANK: 1" in output

    out = tmp_path / "ddp"
    metrics = json.loads((out / "metrics" / "pretrain.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == DDP_STEPS
    assert metrics["tokens_seen"] == DDP_STEPS * DDP_BATCH * BLOCK
    val = [(int(step), float(loss)) for step, loss in csv_rows(out / "plots" / "pretrain" / "val_loss.csv")]
    assert [step for step, _ in val] == [10, 20, 30, 40]

    # Only rank 0 wrote outputs and talked to MLflow (checked before the runs below add theirs): one stage run
    # (with one val_loss per validation) under one pipeline run, and the stage's closing line printed once.
    assert (out / "models" / "pretrain" / "model.pt").is_file()
    assert not list((out / "checkpoints" / "pretrain").glob("*.tmp"))
    assert output.count(f"pretrain: {DDP_STEPS} steps") == 1, output[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("lmpipe").experiment_id])
    assert sorted(run.info.run_name for run in runs) == ["pipeline pytest-ddp", "pretrain"]
    (stage,) = [run for run in runs if run.info.run_name == "pretrain"]
    assert stage.data.metrics["final.world_size"] == 2
    history = client.get_metric_history(stage.info.run_id, "val_loss")
    assert [round(m.value, 4) for m in history] == [round(loss, 4) for _, loss in val]

    one = pretrain(tiny_config(*shape, f"pretrain.batch_size={DDP_BATCH}", root=tmp_path / "one"), run=None)
    for (step, ddp_loss), (_, one_loss) in zip(val, one.curves["val_loss"], strict=True):
        if step in (DDP_STEPS // 2, DDP_STEPS):  # mid-run and final
            assert abs(ddp_loss - one_loss) < DDP_TOLERANCE, (step, ddp_loss, one_loss)
    monkeypatch.setattr(datamodules, "RandomWindows", AllRanksWindows)
    same = pretrain(tiny_config(*shape, f"pretrain.batch_size={DDP_BATCH}", root=tmp_path / "same"), run=None)
    assert [step for step, _ in same.curves["val_loss"]] == [step for step, _ in val]
    assert [loss for _, loss in same.curves["val_loss"]] == pytest.approx(
        [loss for _, loss in val], abs=DDP_EXACT
    )


def slurm_task(rank: int) -> dict[str, str]:
    """The environment `srun --ntasks=2` gives task `rank` on one node, as Lightning's SLURMEnvironment reads it."""
    return {
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_JOB_NAME": "lmpipe-test",
        "SLURM_JOB_ID": "4242",
        "SLURM_NODELIST": "localhost",
        "SLURM_NODEID": "0",
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank),
    }


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_a_launcher_starts_every_rank_and_only_rank_0_tracks(tiny_overrides, tmp_path, conf_dir, launcher):
    # torchrun and srun start both processes at once (Lightning's own launcher starts rank 1 only once rank 0
    # has set up its run): rank 1 must keep out of the MLflow store and the checkpoint folder from its first
    # line on. Without srun here, the two tasks get the environment srun would give them.
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LMPIPE_", "DVC_EXP", "SLURM_"))
    }
    env.update(LMPIPE_PIPELINE_ID=f"pytest-{launcher}", OMP_NUM_THREADS="1")
    stage = [
        "pipelines/pretrain.py",
        *tiny_overrides(),
        f"model.block_size={BLOCK}",
        "trainer=ddp",
        "trainer.max_steps=10",
        f"pretrain.batch_size={BATCH // 2}",
    ]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    tasks = (
        [([*torchrun, *stage], env)]
        if launcher == "torchrun"
        else [([sys.executable, *stage], env | slurm_task(rank)) for rank in (0, 1)]
    )
    logs = [tmp_path / f"launch{n}.log" for n in range(len(tasks))]  # files: a full pipe would stall a rank
    procs = []
    for (cmd, e), log in zip(tasks, logs, strict=True):
        with log.open("w") as out:
            procs.append(
                subprocess.Popen(cmd, cwd=conf_dir.parent, env=e, stdout=out, stderr=subprocess.STDOUT)
            )
    deadline = time.monotonic() + 400
    try:  # a rank that died leaves the other waiting for it: stop at the first failure
        while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs):
            assert time.monotonic() < deadline, "the ranks did not finish in 400 s"
            time.sleep(1)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    output = "".join(log.read_text() for log in logs)
    assert [proc.returncode for proc in procs] == [0] * len(procs), output[-5000:]

    metrics = json.loads((tmp_path / "metrics" / "pretrain.json").read_text())
    assert metrics["world_size"] == 2 and metrics["tokens_seen"] == 10 * BATCH * BLOCK
    assert output.count("pretrain: 10 steps") == 1, output[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("lmpipe").experiment_id])
    assert sorted(run.info.run_name for run in runs) == [f"pipeline pytest-{launcher}", "pretrain"]


def csv_rows(path) -> list[list[str]]:
    """The data rows of a curve CSV (its header dropped)."""
    return [line.split(",") for line in path.read_text().splitlines()[1:]]
