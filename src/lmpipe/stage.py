"""How a pipeline stage starts and stops: config in, one clear line out on failure.

A stage entry point (`pipelines/<stage>.py`) is `run_stage(name, SECTIONS, fn)`. It loads the config
(`params.yaml`, or `conf/` plus Hydra overrides from the command line), checks the sections the stage reads,
calls `fn(cfg)` with only those sections, and turns an `LmpipeError` into `"<stage>: error: <one line>"` on
stderr with exit status 2. `--help` prints every field the stage reads with its value and docstring.

`SECTIONS` is the truth about what a stage reads: `dvc.yaml` declares them as the stage's params (a test holds
the two together), the stage sees no other section, and an override of a section it does not read is an error
naming the stages that do read it (it would otherwise be silently ignored while the stage overwrites its outs).
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lmpipe import config
from lmpipe.errors import LmpipeError

PIPELINES_DIR = Path("pipelines")
USAGE = """usage: python pipelines/{script} [--help] [OVERRIDE ...]

With no overrides the stage reads params.yaml (what `dvc repro` runs). With Hydra overrides such as
`experiment=smoke trainer.max_steps=20` it composes conf/ afresh, as `dvc exp run -S` does.
"""


def run_stage(
    name: str, sections: Sequence[str], fn: Callable[[DictConfig], object], argv: Sequence[str] | None = None
) -> int:
    """Run one stage; returns the process exit status (0 ok, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in ("-h", "--help"):
            print(
                USAGE.format(script=Path(sys.argv[0]).name if sys.argv[0].endswith(".py") else f"{name}.py")
            )
            cfg = config.load(argv[1:])
            check_overrides(name, sections, argv[1:], cfg)
            print(config.describe(cfg, sections))
            return 0
        cfg = config.load(argv)
        check_overrides(name, sections, argv, cfg)
        config.check(cfg, sections, where="overrides" if argv else str(config.PARAMS_FILE))
        if "trainer" in sections:
            warn_if_bf16_is_emulated(name, cfg.trainer)
        fn(OmegaConf.masked_copy(cfg, list(sections)))
    except LmpipeError as exc:
        # Collapse any library text that slipped into the message: the error must stay one line.
        print(f"{name}: error: {config.one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    return 0


CPU_FLAGS_FILE = Path("/proc/cpuinfo")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
"""CPU flags of native bf16 arithmetic. Without them PyTorch emulates bf16 matmuls: measured 0.74 GFLOP/s
against 58 in fp32 on an AVX2-only AMD EPYC, where an AVX-512-BF16 one ran bf16 at 734 (../shared/NOTES.md)."""


def cpu_flags(cpuinfo: Path = CPU_FLAGS_FILE) -> set[str]:
    """The CPU's feature flags from Linux's /proc/cpuinfo (its first `flags` line); empty where there is none."""
    if not cpuinfo.exists():
        return set()
    line = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def warn_if_bf16_is_emulated(name: str, trainer: DictConfig, cpuinfo: Path = CPU_FLAGS_FILE) -> bool:
    """Warn on stderr, once per stage, when a CPU stage trains in bf16 on a CPU without native bf16 (a run
    then takes hours where it should take minutes). Only Linux's /proc/cpuinfo is read; elsewhere nothing is said.
    Returns whether it warned."""
    precision = str(trainer.get("precision", ""))
    if trainer.get("accelerator") != "cpu" or "bf16" not in precision:
        return False
    flags = cpu_flags(cpuinfo)
    if not flags or flags & set(BF16_CPU_FLAGS):
        return False
    print(
        f"{name}: warning: trainer.precision={precision} but this CPU has no native bf16 ({' or '.join(BF16_CPU_FLAGS)} "
        "not in /proc/cpuinfo): bf16 matmuls are emulated, ~80x slower than fp32; pass trainer.precision=32-true "
        "(metrics then differ from a bf16 run)",
        file=sys.stderr,
    )
    return True


def check_overrides(name: str, sections: Sequence[str], overrides: Sequence[str], cfg: DictConfig) -> None:
    """Reject an override of a config section (a key in it, or a group option for it) the stage does not read.

    Only top-level sections of the composed config count: a whole-config preset (`experiment=smoke`, whose
    package is `_global_`), Hydra's own `hydra.*` settings and deletions (`~section`) are not sections.
    """
    if not overrides:
        return
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(list(overrides)):
        section = re.split(r"[./]", override.package or override.key_or_group)[0]
        if section in cfg and section not in sections:
            readers = [stage.name for stage in stage_scripts().values() if section in stage.sections]
            who = f"read by: {', '.join(readers)}" if readers else "no stage reads it"
            raise LmpipeError(
                f"override '{override.input_line}': stage {name} does not read section '{section}' ({who})"
            )


@dataclass(frozen=True)
class StageScript:
    """One `pipelines/*.py` entry point as its source declares it."""

    name: str
    """The stage's name: the first argument of its `run_stage` call (the DVC stage name)."""
    path: Path
    sections: tuple[str, ...]
    """Its `SECTIONS` constant: the config sections it reads."""


def stage_scripts(folder: str | Path = PIPELINES_DIR) -> dict[str, StageScript]:
    """Every stage script in `folder` by stage name, read with `ast` (importing one would run its imports)."""
    scripts = {}
    for path in sorted(Path(folder).glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        sections = next(
            (
                tuple(ast.literal_eval(node.value))
                for node in tree.body
                if isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "SECTIONS" for t in node.targets)
            ),
            None,
        )
        names = [
            node.args[0].value
            for node in ast.walk(tree)
            if isinstance(node, ast.Call)
            and getattr(node.func, "id", getattr(node.func, "attr", None)) == "run_stage"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ]
        if sections is not None and names:
            scripts[names[0]] = StageScript(names[0], path, sections)
    return scripts
