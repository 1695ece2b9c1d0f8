"""dvc.yaml declares exactly what each stage runs, so `dvc repro` re-runs a stage if and only if its inputs changed.

Everything is computed from the code at test time (see tests/dvc_graph.py): the import closure of each
`pipelines/*.py` script inside lmpipe (read with `ast`, imports inside functions included, plus the modules
named by `_target_` in the config sections it reads), and the sections in its `SECTIONS` constant.
"""

import dvc_graph
import pytest
from dvc_graph import EXEMPT, PARAMS_EXEMPT, ROOT, covers, has_code

from lmpipe.stage import stage_scripts

STAGES = dvc_graph.dvc_stages()


def test_every_stage_script_is_a_dvc_stage_that_runs_it():
    assert set(stage_scripts(ROOT / "pipelines")) == set(STAGES)
    import yaml

    raw = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    for name, stage in STAGES.items():
        assert raw[name]["cmd"] == f"python {stage.script.relative_to(ROOT)}"


@pytest.mark.parametrize("name", STAGES)
def test_code_deps_are_exactly_the_code_the_stage_runs(name):
    stage = STAGES[name]
    runs = dvc_graph.code_files(stage.script, stage.sections)
    declared = stage.code_deps
    missing = sorted(f for f in runs if not any(covers(dep, f) for dep in declared))
    assert not missing, f"stage {name} runs {', '.join(missing)}, but they are not among its deps in dvc.yaml"
    for dep in sorted(declared):
        path = ROOT / dep
        assert path.exists(), f"stage {name}: dep {dep} does not exist"
        assert dep not in EXEMPT, f"stage {name}: {dep} is exempt ({EXEMPT[dep]}): drop it from its deps"
        if path.is_dir():
            files = {str(p.relative_to(ROOT)) for p in path.rglob("*.py") if has_code(p)}
            unused = sorted(files - runs)
            assert not unused, (
                f"stage {name} depends on {dep}/ but does not run {', '.join(unused)}: list files"
            )
        else:
            assert dep in runs, f"stage {name} depends on {dep}, which it does not run"


@pytest.mark.parametrize("name", STAGES)
def test_params_are_the_sections_the_stage_reads(name):
    stage = STAGES[name]
    assert set(stage.params) == set(stage.sections) - PARAMS_EXEMPT, (
        f"stage {name}: dvc.yaml params {sorted(stage.params)}, but {stage.script.name} reads"
        f" {sorted(set(stage.sections) - PARAMS_EXEMPT)} (SECTIONS, less {sorted(PARAMS_EXEMPT)})"
    )


@pytest.mark.parametrize("name", STAGES)
def test_data_deps_are_outputs_of_earlier_stages(name):
    order = list(STAGES)
    earlier = [out for stage in order[: order.index(name)] for out in STAGES[stage].outs]
    for dep in sorted(set(STAGES[name].deps) - STAGES[name].code_deps):
        assert any(covers(out, dep) for out in earlier), f"stage {name}: {dep} is no earlier stage's output"


def test_exemptions_are_listed_in_dvc_yaml_and_exist():
    header = (ROOT / "dvc.yaml").read_text(encoding="utf-8").split("\nstages:")[0]
    for path in EXEMPT:
        assert (ROOT / path).is_file(), path
        assert path.removeprefix("src/lmpipe/") in header, f"dvc.yaml's header does not mention exempt {path}"


def test_closure_follows_function_level_and_submodule_imports(tmp_path):
    script = tmp_path / "stage.py"
    script.write_text(
        "from typing import TYPE_CHECKING\n"
        "from lmpipe import errors\n"
        "if TYPE_CHECKING:\n"
        "    from lmpipe import model\n"
        "def main(cfg):\n"
        "    from lmpipe.data import splits\n"
        "    import lmpipe.formats\n",
        encoding="utf-8",
    )
    assert dvc_graph.direct_imports(script, None) == {
        "lmpipe",
        "lmpipe.errors",
        "lmpipe.data",
        "lmpipe.data.splits",
        "lmpipe.formats",
    }
    # The sections' `_target_` modules run too (hydra imports them to build the section).
    assert "lmpipe.tokenizer" in dvc_graph.closure(script, ("tokenizer",))
    assert "lmpipe.tokenizer" not in dvc_graph.closure(script, ())


def test_training_curves_are_cached_outputs_with_a_plot_so_each_experiment_keeps_and_draws_them():
    # `dvc plots diff` of two experiments reads each one's plot data from the cache: an uncached
    # (`cache: false`) output is not part of an experiment, and its curves are lost to the comparison.
    import yaml

    raw = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))
    plot_outs = []
    for name, stage in raw["stages"].items():
        for out in stage.get("outs", []):
            path, opts = (out, {}) if isinstance(out, str) else next(iter(out.items()))
            if path.startswith("${paths.plots}/"):
                assert opts.get("cache", True), f"stage {name}: {path} is cache: false"
                plot_outs.append(path)
    assert plot_outs
    drawn = " ".join(str(entry) for entry in raw["plots"])
    undrawn = [p for p in plot_outs if p not in drawn]
    assert not undrawn, f"no plot in dvc.yaml draws {undrawn}"


def test_a_clone_gets_every_output_from_git_or_the_dvc_remote():
    # What a clone needs: git and `dvc pull`. An out that is neither cached nor kept by git exists only where it
    # was made, so a clone's `dvc repro` would run its stage again. Checkpoints are no stage's out for that
    # reason (dvc.yaml's header says why): resume is keyed on the fingerprint, not on DVC.
    import subprocess

    from omegaconf import OmegaConf

    checkpoints = OmegaConf.load(ROOT / "params.yaml").paths.checkpoints
    for stage in STAGES.values():
        assert not any(covers(checkpoints, out) for out in stage.outs), (
            f"stage {stage.name} outputs checkpoints"
        )
    uncached = [out for stage in STAGES.values() for out in stage.uncached]
    assert "metrics/evaluate.json" in uncached
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", *uncached], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    assert not ignored, f"cache: false outs that git ignores, so a clone lacks them: {ignored}"
