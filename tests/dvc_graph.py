"""What each DVC stage runs, computed from the code (with `ast`, nothing imported) and from dvc.yaml.

Shared by tests/test_dvc_graph.py (dvc.yaml declares exactly that code and those params) and the end-to-end
test (editing one module makes `dvc status` list exactly the stages that run it).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from lmpipe.stage import stage_scripts

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "lmpipe"

# Plumbing every stage runs that cannot change an output, so no stage depends on it (dvc.yaml's header says
# the same). Files without code (a package `__init__.py` holding a docstring, `__version__`) are exempt too.
EXEMPT = {
    "src/lmpipe/stage.py": "the stage runner: loads the config, calls the stage, prints a failure in one line",
    "src/lmpipe/config.py": "composes and validates the config; the values a stage sees are its DVC params",
    "src/lmpipe/tracking.py": "MLflow logging: runs, tags, params and metrics, never an output file",
    "src/lmpipe/errors.py": "the error type and its one-line message",
    "src/lmpipe/atomic.py": "writes outputs via a temporary path and a rename; the bytes are the caller's",
}
# Config sections that are not DVC params of a stage: `paths` is interpolated into dvc.yaml itself (a changed
# path is a changed dep or out) and `logger` only says where MLflow records.
PARAMS_EXEMPT = {"paths", "logger"}


def module_file(module: str) -> Path | None:
    """src/ path of an lmpipe module or package (its __init__.py), or None if there is none."""
    base = SRC.joinpath(*module.split("."))
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the nodes inside `if TYPE_CHECKING:` blocks (never executed)."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    return skipped


def direct_imports(path: Path, module: str | None) -> set[str]:
    """lmpipe modules a file imports anywhere (functions included), with `from pkg import submodule` resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    skipped = _type_checking_only(tree)
    package = (module if path.name == "__init__.py" else module.rpartition(".")[0]) if module else ""
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(
                    [*parts[: len(parts) - node.level + 1], *([node.module] if node.module else [])]
                )
            else:
                base = node.module or ""
            found.add(base)
            found.update(
                f"{base}.{alias.name}" for alias in node.names if module_file(f"{base}.{alias.name}")
            )
    return {name for name in found if name.partition(".")[0] == PACKAGE and module_file(name)}


def section_targets(sections: tuple[str, ...]) -> set[str]:
    """Modules named by `_target_` anywhere in conf/ under the given sections (every group option counts)."""
    targets = set()

    def collect(node) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("_target_"), str):
                targets.add(node["_target_"].rpartition(".")[0])
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    for path in sorted((ROOT / "conf").rglob("*.yaml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        group = path.parent.relative_to(ROOT / "conf").parts
        is_global = not group or "@package _global_" in path.read_text(encoding="utf-8").splitlines()[0]
        by_section = data if is_global else {group[0]: data}
        for name in sections:
            collect(by_section.get(name))
    return {t for t in targets if t.partition(".")[0] == PACKAGE and module_file(t)}


def closure(script: Path, sections: tuple[str, ...]) -> set[str]:
    """Every lmpipe module a stage script runs: its imports and theirs (the exempt plumbing's too: what it
    imports is shared code a stage runs), its sections' `_target_` modules, and the packages they live in
    (importing `a.b.c` runs `a/__init__.py` and `a/b/__init__.py`)."""
    todo = direct_imports(script, None) | section_targets(sections)
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo.update(".".join(parts[:i]) for i in range(1, len(parts)))
        todo.update(direct_imports(module_file(name), name) - seen)
    return seen


def has_code(path: Path) -> bool:
    """Whether a file does anything beyond a docstring and `__version__`/`__all__` assignments."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue
        if isinstance(node, ast.Assign) and all(
            isinstance(t, ast.Name) and t.id in ("__version__", "__all__") for t in node.targets
        ):
            continue
        return True
    return False


def code_files(script: Path, sections: tuple[str, ...]) -> set[str]:
    """Repository paths of the code a stage's outputs depend on: its script and its modules, less the exempt
    plumbing and files without code."""
    files = {str(module_file(m).relative_to(ROOT)) for m in closure(script, sections)}
    return {f"pipelines/{script.name}"} | {f for f in files if f not in EXEMPT and has_code(ROOT / f)}


@dataclass(frozen=True)
class Stage:
    name: str
    script: Path
    sections: tuple[str, ...]
    deps: tuple[str, ...]
    outs: tuple[str, ...]
    params: tuple[str, ...]
    uncached: tuple[str, ...] = ()
    """The outs marked `cache: false` (git must keep them, or a clone lacks them)."""

    @property
    def code_deps(self) -> set[str]:
        """The deps that are code (under src/ or pipelines/)."""
        return {d for d in self.deps if d.startswith(("src/", "pipelines/"))}


def dvc_stages(root: Path = ROOT) -> dict[str, Stage]:
    """dvc.yaml's stages, `${...}` interpolated from params.yaml as DVC does, beside their scripts' SECTIONS."""
    params = OmegaConf.load(root / "params.yaml")

    def paths(entries) -> tuple[str, ...]:
        # An entry is a path, or a one-key mapping {path: options}; DVC interpolates both forms.
        names = (next(iter(e)) if isinstance(e, dict) else e for e in entries or [])
        return tuple(
            re.sub(r"\$\{([\w.]+)\}", lambda m: str(OmegaConf.select(params, m[1])), n) for n in names
        )

    raw = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    scripts = stage_scripts(root / "pipelines")
    stages = {}
    for name, spec in raw.items():
        script = scripts[name]
        outs = paths(spec.get("outs")) + paths(spec.get("metrics")) + paths(spec.get("plots"))
        params_ = tuple(
            p for entry in spec.get("params", []) for p in ([entry] if isinstance(entry, str) else entry)
        )
        entries = [*(spec.get("outs") or []), *(spec.get("metrics") or []), *(spec.get("plots") or [])]
        uncached = paths(
            e for e in entries if isinstance(e, dict) and next(iter(e.values())).get("cache") is False
        )
        stages[name] = Stage(
            name, script.path, script.sections, paths(spec.get("deps")), outs, params_, uncached
        )
    return stages


def covers(dep: str, path: str) -> bool:
    return path == dep or path.startswith(dep.rstrip("/") + "/")


def stages_running(path: str, stages: dict[str, Stage]) -> set[str]:
    """The stages whose declared deps cover a file."""
    return {name for name, stage in stages.items() if any(covers(d, path) for d in stage.deps)}
