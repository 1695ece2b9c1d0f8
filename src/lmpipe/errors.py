"""One exception type for every user-facing failure, so stages can stop with a single clear line."""


class LmpipeError(Exception):
    """A problem with the user's input (a file, a config field, a missing upstream output).

    The message is one line that names the culprit (path, field, value) and what was expected;
    stage entry points print it without a traceback and exit non-zero.
    """


def require_file(path, produced_by: str | None = None):
    """Return `path` as a Path, or raise a one-line error saying which stage should have made it."""
    from pathlib import Path

    p = Path(path)
    if not p.exists():
        hint = f" (run the '{produced_by}' stage first: dvc repro {produced_by})" if produced_by else ""
        raise LmpipeError(f"missing input {p}{hint}")
    return p


def run_main(program: str, main) -> None:
    """Run a command-line `main()`; an LmpipeError ends it with `<program>: error: <message>` and exit status 2."""
    import sys

    try:
        main()
    except LmpipeError as exc:
        print(f"{program}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1, else argparse's one-line usage error."""
    import argparse

    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value
