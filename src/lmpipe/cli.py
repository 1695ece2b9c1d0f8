"""The `lmpipe` command line. Kept light: heavy libraries are imported only by the subcommand that needs them."""

from __future__ import annotations

import argparse
import sys

from lmpipe.errors import LmpipeError


def cmd_params(args: argparse.Namespace) -> None:
    """Compose conf/ (plus overrides) and write it to params.yaml, exactly as `dvc exp run -S` would."""
    from lmpipe import atomic, config

    text = config.params_yaml(args.overrides)
    if args.check:
        current = config.PARAMS_FILE.read_text(encoding="utf-8") if config.PARAMS_FILE.exists() else ""
        if current != text:
            raise LmpipeError(
                f"{config.PARAMS_FILE} differs from the composition of conf/: run 'make params'"
            )
        print(f"{config.PARAMS_FILE} matches conf/")
        return
    atomic.write_text(config.PARAMS_FILE, text)
    print(f"wrote {config.PARAMS_FILE}" + (f" with {' '.join(args.overrides)}" if args.overrides else ""))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmpipe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("params", help="write params.yaml from conf/ (Hydra composition)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=smoke model.n_layer=6")
    p.add_argument("--check", action="store_true", help="exit 2 if params.yaml differs instead of writing it")
    p.set_defaults(func=cmd_params)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except LmpipeError as exc:
        from lmpipe.config import one_line

        print(f"lmpipe {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
