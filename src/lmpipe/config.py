"""Configuration: compose `conf/` with Hydra, or read the composed `params.yaml` that DVC tracks.

Two ways in, one result:
- `dvc repro` runs a stage with no arguments: the stage reads `params.yaml`, which DVC tracks (and which
  `dvc exp run -S ...` rewrites by composing `conf/` with the overrides, because `.dvc/config` enables Hydra).
- A person runs `python pipelines/pretrain.py experiment=smoke trainer.max_steps=20`: the stage composes `conf/`
  with those overrides itself, exactly as DVC would, and never touches `params.yaml`.

Each config section names its schema with `_target_` (a dataclass whose fields carry one-line docstrings, or a
class such as Lightning's Trainer). `build()` turns a section into that object with `hydra.utils.instantiate`,
and `check()` rejects keys the schema does not know, so a typo is an error rather than a silent default.

A schema is declared with `@schema("section")`: a pydantic dataclass, so types and bounds are declared beside
each field (`Annotated[int, Field(ge=1)]`, `Literal[...]`) instead of checked by hand, and every violation
becomes one `LmpipeError` line naming the field, the value and what is expected. Checks that involve several
fields stay in `__post_init__`, which runs after pydantic's own.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import importlib.util
import inspect
import os
import re
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from lmpipe.errors import LmpipeError

if TYPE_CHECKING:
    from pydantic import ValidationError

CONF_DIR = Path("conf")
CONFIG_NAME = "config"
PARAMS_FILE = Path("params.yaml")


def schema(section: str):
    """Class decorator: a config section's schema, a pydantic-validated dataclass whose errors are one line.

    Strict types (no bool for an int, no "3" for a number; an int is fine for a float), unknown keys refused.
    """
    import pydantic
    from pydantic import ConfigDict

    def wrap(cls: type) -> type:
        cls = pydantic.dataclasses.dataclass(
            cls, config=ConfigDict(strict=True, extra="forbid", arbitrary_types_allowed=True)
        )
        validate_init = cls.__init__

        @functools.wraps(validate_init)
        def __init__(self, *args, **kwargs):
            try:
                validate_init(self, *args, **kwargs)
            except pydantic.ValidationError as exc:
                raise LmpipeError(validation_message(exc, section)) from None

        cls.__init__ = __init__
        cls.__lmpipe_section__ = section
        return cls

    return wrap


def validation_message(exc: ValidationError, section: str) -> str:
    """pydantic's first error as `section.field=value: expected ...` (one line)."""
    error = exc.errors(include_url=False)[0]
    name = ".".join(str(part) for part in (section, *error["loc"]) if part != "")
    if error["type"] == "missing":
        return f"{name}: missing; expected a value"
    if error["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        return f"{name}: unknown field"
    expected = error["msg"].removeprefix("Input should be ").removeprefix("Value error, ")
    if expected.startswith(("greater", "less")):
        expected = "a value " + expected
    return f"{name}={error.get('input')!r}: expected {expected}"


def compose(overrides: Sequence[str] = (), conf_dir: str | os.PathLike = CONF_DIR) -> DictConfig:
    """Compose `conf/config.yaml` with Hydra overrides and resolve interpolations, as `dvc exp run -S` does."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    conf_dir = Path(conf_dir).resolve()
    if not (conf_dir / f"{CONFIG_NAME}.yaml").exists():
        raise LmpipeError(f"missing {conf_dir / CONFIG_NAME}.yaml (run from the repository root)")
    try:
        with initialize_config_dir(str(conf_dir), version_base=None):
            cfg = hydra_compose(config_name=CONFIG_NAME, overrides=list(overrides))
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as exc:
        cause = f" ({one_line(exc.__cause__)})" if exc.__cause__ else ""
        raise LmpipeError(f"config overrides {list(overrides)}: {one_line(exc)}{cause}") from exc
    return cfg


def params_yaml(overrides: Sequence[str] = (), conf_dir: str | os.PathLike = CONF_DIR) -> str:
    """The text DVC writes to params.yaml for these overrides (same composition, same YAML dump)."""
    return OmegaConf.to_yaml(compose(overrides, conf_dir))


def load(overrides: Sequence[str] = (), params_file: str | os.PathLike = PARAMS_FILE) -> DictConfig:
    """The run's config: `params.yaml` when there are no overrides, else a fresh composition of `conf/`."""
    params_file = Path(params_file)
    if overrides or not params_file.exists():
        return compose(overrides)
    try:
        cfg = OmegaConf.load(params_file)
    except Exception as exc:  # YAML errors come in several types; all mean the same to the user
        raise LmpipeError(f"{params_file}: not valid YAML: {one_line(exc)}") from exc
    if not isinstance(cfg, DictConfig):
        raise LmpipeError(f"{params_file}: expected a mapping of config sections, got {type(cfg).__name__}")
    return cfg


def check(cfg: DictConfig, sections: Iterable[str], where: str = "config") -> None:
    """Reject missing sections and keys that a section's schema does not know (one line naming the key)."""
    for name in sections:
        if name not in cfg:
            raise LmpipeError(f"{where}: missing section '{name}'")
        section = cfg[name]
        if not isinstance(section, DictConfig):
            continue
        if "_target_" not in section:
            # A plain mapping such as `paths`: its keys are the ones conf/ defines.
            reference = _reference().get(name)
            unknown = sorted(set(section) - set(reference)) if isinstance(reference, DictConfig) else []
            if unknown:
                raise LmpipeError(
                    f"{where}: unknown key '{name}.{unknown[0]}' (known: {', '.join(reference)})"
                )
            continue
        known = schema_fields(section._target_)
        if known is None:  # the target takes **kwargs: nothing to check against
            continue
        for key in section:
            if key not in known and not str(key).startswith("_"):
                close = ", ".join(sorted(k for k in known if k[:2] == str(key)[:2])[:5])
                hint = f" (did you mean: {close}?)" if close else ""
                raise LmpipeError(f"{where}: unknown key '{name}.{key}' for {section._target_}{hint}")


@functools.cache
def _reference() -> DictConfig:
    """The default composition of conf/ (for checking sections that have no schema class)."""
    return compose([]) if (CONF_DIR / f"{CONFIG_NAME}.yaml").exists() else OmegaConf.create({})


def build(section: DictConfig, **kwargs: Any) -> Any:
    """Instantiate a config section through its `_target_` (lists and dicts arrive as plain Python)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(section, _convert_="all", **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, LmpipeError):
            raise cause from None
        raise LmpipeError(f"cannot build {section.get('_target_')}: {one_line(cause or exc)}") from exc


def to_container(section: DictConfig) -> dict:
    """A section as a plain dict without Hydra's `_target_`/`_partial_` keys (for logging and hashing)."""
    data = OmegaConf.to_container(section, resolve=True)
    return {k: v for k, v in data.items() if not str(k).startswith("_")} if isinstance(data, dict) else data


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """`{"model": {"n_layer": 4}}` -> `{"model.n_layer": 4}`; lists stay values."""
    if isinstance(data, DictConfig):
        data = OmegaConf.to_container(data, resolve=True)
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(flatten(value, name) if isinstance(value, dict) else {name: value})
    return out


def one_line(exc: BaseException) -> str:
    """Collapse a (often multi-line) library error message into one line."""
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    return text or type(exc).__name__


# --- `--help`: the schema's field docstrings, beside the values in effect -------------------------------------


def resolve_target(target: str) -> Any:
    module, _, name = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise LmpipeError(f"config: _target_ '{target}' cannot be imported: {one_line(exc)}") from exc


@dataclasses.dataclass(frozen=True)
class TargetSchema:
    """What `check` and `describe` need to know of a `_target_`."""

    fields: tuple[str, ...] | None
    """Names it accepts (None: it takes **kwargs, so any key goes)."""
    docs: dict[str, str]
    """One line of documentation per field."""
    lists_defaults: bool
    """Whether `--help` lists the fields a section leaves out (a dataclass's: a handful, all documented)."""


@functools.cache
def target_schema(target: str) -> TargetSchema:
    """The schema of a `_target_`: lmpipe's own dataclasses are imported (their modules are kept light), any
    other target is read from its source with `ast`, so that `--help` and the key check never import a third
    party stack (Lightning's Trainer costs seconds to import)."""
    if target.partition(".")[0] != "lmpipe":
        return _schema_from_source(target)
    obj = resolve_target(target)
    if dataclasses.is_dataclass(obj):
        return TargetSchema(tuple(f.name for f in dataclasses.fields(obj)), field_docs(obj), True)
    params = inspect.signature(obj).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return TargetSchema(None, {}, False)
    return TargetSchema(tuple(p.name for p in params if p.name != "self"), {}, False)


def schema_fields(target: str) -> set[str] | None:
    """Names the target accepts: dataclass fields, or constructor parameters (None if it takes **kwargs)."""
    fields = target_schema(target).fields
    return None if fields is None else set(fields)


def _schema_from_source(target: str) -> TargetSchema:
    """A class's constructor parameters and their `Args:` docs (Google style), read from its source file."""
    cls = _class_def(target)
    init = next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
    if init is None:
        return TargetSchema(None, {}, False)
    args = init.args
    if args.kwarg is not None:
        return TargetSchema(None, {}, False)
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs) if a.arg != "self"]
    return TargetSchema(tuple(names), _args_docs(ast.get_docstring(init) or "", names), False)


def _class_def(target: str, hops: int = 8) -> ast.ClassDef:
    """The `class` statement of `package.module.Name`, following `from x import Name` re-exports."""
    module, _, name = target.rpartition(".")
    for _ in range(hops):
        path = _module_file(module)
        if path is None:
            break
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name == name:
                return node
        source = next(
            (
                (node, alias.name)
                for node in tree.body
                if isinstance(node, ast.ImportFrom)
                for alias in node.names
                if (alias.asname or alias.name) == name
            ),
            None,
        )
        if source is None:
            break
        node, name = source
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
        module = ".".join([*base, node.module] if node.module else base)
    raise LmpipeError(f"config: _target_ '{target}' cannot be found in its package's source")


def _module_file(module: str) -> Path | None:
    """The source file of a dotted module, found without importing it or its parent packages."""
    top, *rest = module.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None:
        return None
    roots = [Path(p) for p in spec.submodule_search_locations or []] or [Path(spec.origin).parent]
    for root in roots:
        path = root.joinpath(*rest) if rest else root
        for candidate in (path / "__init__.py", path.with_suffix(".py")):
            if candidate.is_file():
                return candidate
    return None


def _args_docs(docstring: str, names: Sequence[str]) -> dict[str, str]:
    """`name: text` entries of a Google-style `Args:` section: the first sentence of each."""
    docs, current = {}, None
    for line in docstring.splitlines():
        match = re.match(r"\s{0,8}(\w+): (.*)", line)
        if match and match.group(1) in names:
            current = match.group(1)
            docs[current] = match.group(2)
        elif current and line.strip() and not line.strip().startswith("Default:"):
            docs[current] += " " + line.strip()
        else:
            current = None
    return {k: re.split(r"(?<=[.!?])\s", " ".join(v.split()), maxsplit=1)[0] for k, v in docs.items()}


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass: the string literal on the line after each field, inherited ones
    included (a schema may reuse fields declared once in a base class)."""
    docs: dict[str, str] = {}
    for base in reversed(cls.__mro__[:-1]):  # the subclass's own docs win
        docs.update(_own_field_docs(base))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe(cfg: DictConfig, sections: Iterable[str]) -> str:
    """Human-readable help: every field of the given sections, its current value and its docstring."""
    lines = []
    for name in sections:
        section = cfg.get(name)
        if not isinstance(section, DictConfig):
            lines.append(f"{name}: {section!r}")
            continue
        target = section.get("_target_")
        lines.append(f"{name}:" + (f"  ({target})" if target else ""))
        schema = target_schema(target) if target else TargetSchema(None, {}, False)
        values = OmegaConf.to_container(section, resolve=True)
        for key, value in values.items():
            if str(key).startswith("_"):
                continue
            doc = schema.docs.get(str(key), "")
            lines.append(f"  {name}.{key}={value!r}" + (f"  # {doc}" if doc else ""))
        if schema.lists_defaults:
            for field in schema.fields:
                if field not in section:
                    lines.append(f"  {name}.{field} (default)  # {schema.docs.get(field, '')}")
    return "\n".join(lines)
