"""How a pipeline stage starts and stops: config in, one clear line out on failure.

A stage entry point (`pipelines/<stage>.py`) is `run_stage(name, sections, fn)`. It loads the config
(`params.yaml`, or `conf/` plus Hydra overrides from the command line), checks the sections the stage reads,
calls `fn(cfg)`, and turns an `LmpipeError` into `"<stage>: error: <one line>"` on stderr with exit status 2.
`--help` prints every field the stage reads with its value and docstring.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from omegaconf import DictConfig

from lmpipe import config
from lmpipe.errors import LmpipeError

USAGE = """usage: python pipelines/{name}.py [--help] [OVERRIDE ...]

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
            print(USAGE.format(name=name))
            print(config.describe(config.load(argv[1:]), sections))
            return 0
        cfg = config.load(argv)
        config.check(cfg, sections, where="overrides" if argv else str(config.PARAMS_FILE))
        fn(cfg)
    except LmpipeError as exc:
        # Collapse any library text that slipped into the message: the error must stay one line.
        print(f"{name}: error: {config.one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    return 0
