"""lmpipe.config: composition of conf/, params.yaml as DVC writes it, key checking, building, --help text."""

import dataclasses
import shutil
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from lmpipe import config
from lmpipe.errors import LmpipeError
from lmpipe.model import GPTConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
GROUPS = ("data", "tokenizer", "model", "optimizer", "trainer", "logger", "experiment")
TARGET_SECTIONS = {
    "pretrain",
    "perf",
    "instructions",
    "sft",
    "mlm",
    "encoder",
    "encoder_distill",
    "preferences",
    "reward",
    "dpo",
    "rl",
    "distill",
    "export",
    "prune",
    "quantize",
    "register",
    "infer",
    "evaluate",
    "data",
    "validate",
    "tokenizer",
    "model",
    "optimizer",
    "trainer",
    "logger",
}
# Options that cannot be built as shipped: data=text needs the user's files (its paths default to []).
REQUIRED_OVERRIDES = {("data", "text"): ["data.paths=[corpus.txt]"]}
GROUP_OPTIONS = [(group, path.stem) for group in GROUPS for path in sorted((CONF / group).glob("*.yaml"))]


@pytest.fixture
def conf_copy(tmp_path, monkeypatch):
    """A working directory holding a copy of conf/ (and no params.yaml), as a stage sees the repo root."""
    shutil.copytree(CONF, tmp_path / "conf")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def target_sections(cfg: DictConfig) -> list[str]:
    return [name for name in cfg if isinstance(cfg[name], DictConfig) and "_target_" in cfg[name]]


def needs_cuda(trainer: DictConfig) -> bool:
    return trainer.accelerator == "gpu" or trainer.strategy == "fsdp"


def test_committed_params_yaml_is_the_composition_of_conf():
    # Fails when someone edits conf/ and forgets `make params` (or edits params.yaml by hand).
    committed = (ROOT / "params.yaml").read_text(encoding="utf-8")
    assert committed == config.params_yaml([], conf_dir=CONF)


def test_every_group_has_options():
    assert {group for group, _ in GROUP_OPTIONS} == set(GROUPS)


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_group_option_composes_checks_and_builds(group, option, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a built Trainer must not leave anything in the repo
    extra = REQUIRED_OVERRIDES.get((group, option), [])
    cfg = config.compose([f"{group}={option}", *extra], conf_dir=CONF)

    # The option's own values are in effect (files marked `@package _global_` hold whole sections).
    path = CONF / group / f"{option}.yaml"
    raw = OmegaConf.load(path)
    raw.pop("defaults", None)
    is_global = "@package _global_" in path.read_text(encoding="utf-8").splitlines()[0]
    expected = config.flatten(
        OmegaConf.to_container(raw) if is_global else {group: OmegaConf.to_container(raw)}
    )
    for override in extra:
        del expected[override.split("=")[0]]
    composed = config.flatten(cfg)
    assert {k: composed[k] for k in expected} == expected

    sections = target_sections(cfg)
    assert set(sections) == TARGET_SECTIONS
    config.check(cfg, sections)
    for name in sections:
        section = cfg[name]
        cls = config.resolve_target(section._target_)
        if name == "trainer":
            if needs_cuda(section):
                continue  # a GPU Trainer cannot be built without CUDA; its keys were checked above
            built = config.build(section, logger=False)
            assert isinstance(built, cls)
            assert built.max_steps == section.max_steps
            continue
        built = config.build(section)
        assert isinstance(built, cls)
        values = config.to_container(section)
        assert {key: getattr(built, key) for key in values} == values


def test_smoke_experiment_overrides_group_defaults():
    cfg = config.compose(["experiment=smoke"], conf_dir=CONF)
    assert cfg.model.n_layer == 2  # from model/gpt-tiny via the experiment's defaults override
    assert cfg.trainer.max_steps == 30
    assert list(cfg.data.books) == ["Genesis", "Ruth", "Jonah", "Mark", "Philemon", "Jude"]
    assert cfg.trainer.accelerator == "cpu"  # untouched keys keep the group default


def test_every_schema_field_has_a_docstring():
    cfg = config.compose([], conf_dir=CONF)
    for name in target_sections(cfg):
        cls = config.resolve_target(cfg[name]._target_)
        if not dataclasses.is_dataclass(cls):
            continue
        docs = config.field_docs(cls)
        undocumented = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert undocumented == [], f"{cls.__qualname__} fields without a docstring"


# --- DVC parity ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["experiment=smoke"],
        ["model=gpt-tiny", "optimizer=sgd", "trainer.max_steps=7", "data.books=[Ruth,Jonah]", "seed=3"],
        ["data=text", "data.paths=[a.txt,b.jsonl]", "tokenizer=char", "trainer=ddp"],
    ],
    ids=["defaults", "smoke", "mixed", "text-ddp"],
)
def test_params_yaml_matches_dvc_composition(overrides, tmp_path):
    from dvc.utils.hydra import compose_and_dump

    out = tmp_path / "params.yaml"
    compose_and_dump(out, str(CONF), None, "config", str(tmp_path / "hydra_plugins"), list(overrides))
    assert config.params_yaml(overrides, conf_dir=CONF) == out.read_text(encoding="utf-8")


# --- unknown keys and bad values -----------------------------------------------------------------------------


def test_unknown_key_in_override_names_the_key():
    with pytest.raises(LmpipeError, match=r"model\.n_layr"):
        config.compose(["model.n_layr=3"], conf_dir=CONF)


def test_added_unknown_key_is_caught_by_check_with_a_hint():
    cfg = config.compose(["+model.n_layr=3"], conf_dir=CONF)
    with pytest.raises(LmpipeError) as err:
        config.check(cfg, ["model"], where="overrides")
    message = str(err.value)
    assert message.startswith("overrides: unknown key 'model.n_layr' for lmpipe.model_config.GPTConfig")
    assert "did you mean: n_embd, n_head, n_layer?" in message
    assert "\n" not in message


def test_unknown_trainer_argument_is_caught():
    # Lightning's Trainer is a class, not a dataclass: its constructor parameters are the schema.
    cfg = config.compose(["+trainer.max_stepz=5"], conf_dir=CONF)
    with pytest.raises(
        LmpipeError, match=r"unknown key 'trainer\.max_stepz' for lightning\.pytorch\.Trainer"
    ):
        config.check(cfg, ["trainer"])


def test_unknown_key_in_params_yaml_section(tmp_path):
    params = tmp_path / "params.yaml"
    text = config.params_yaml([], conf_dir=CONF).replace("\n  n_layer: 4\n", "\n  n_layer: 4\n  n_layr: 3\n")
    params.write_text(text, encoding="utf-8")
    cfg = config.load([], params_file=params)
    config.check(cfg, ["data", "tokenizer"], where=str(params))  # sections without the typo pass
    with pytest.raises(LmpipeError, match=r"params\.yaml: unknown key 'model\.n_layr'"):
        config.check(cfg, ["tokenizer", "model"], where=str(params))


def test_missing_section_is_named():
    cfg = OmegaConf.create({"seed": 1})
    with pytest.raises(LmpipeError, match=r"params\.yaml: missing section 'model'"):
        config.check(cfg, ["seed", "model"], where="params.yaml")


def test_unimportable_target_is_named():
    cfg = OmegaConf.create({"model": {"_target_": "lmpipe.model.NoSuchConfig", "n_layer": 1}})
    with pytest.raises(LmpipeError, match=r"_target_ 'lmpipe\.model\.NoSuchConfig' cannot be imported"):
        config.check(cfg, ["model"])


def test_build_passes_schema_errors_through_and_wraps_others():
    cfg = config.compose(["model.pos_encoding=foo"], conf_dir=CONF)
    with pytest.raises(LmpipeError) as err:
        config.build(cfg.model)
    assert str(err.value) == "model.pos_encoding='foo': expected 'learned', 'sinusoidal' or 'rotary'"

    bad = OmegaConf.create({"_target_": "lmpipe.model_config.GPTConfig", "no_such_field": 1})
    with pytest.raises(LmpipeError, match=r"^model\.no_such_field: unknown field$"):
        config.build(bad)
    # A target that is not an lmpipe schema fails with its own error, wrapped into one line naming it.
    other = OmegaConf.create({"_target_": "fractions.Fraction", "no_such_field": 1})
    with pytest.raises(LmpipeError, match=r"^cannot build fractions\.Fraction: .*no_such_field"):
        config.build(other)


def test_build_applies_keyword_arguments_and_converts_lists():
    cfg = config.compose([], conf_dir=CONF)
    model = config.build(cfg.model, vocab_size=321)
    assert isinstance(model, GPTConfig) and model.vocab_size == 321 and model.n_layer == 4
    optimizer = config.build(cfg.optimizer)
    assert optimizer.betas == [0.9, 0.95] and type(optimizer.betas) is list


# --- load ----------------------------------------------------------------------------------------------------


def test_load_reads_params_yaml_without_overrides_and_composes_with_them(conf_copy):
    params = conf_copy / "params.yaml"
    params.write_text(config.params_yaml([]).replace("seed: 1337", "seed: 7"), encoding="utf-8")
    assert config.load([], params_file=params).seed == 7
    assert config.load(["model.n_layer=6"], params_file=params).seed == 1337  # conf/, not params.yaml
    assert config.load(["model.n_layer=6"], params_file=params).model.n_layer == 6
    params.unlink()
    assert config.load([], params_file=params).seed == 1337  # no params.yaml: compose conf/


def test_load_rejects_broken_params_yaml(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("model: [unclosed\n", encoding="utf-8")
    with pytest.raises(LmpipeError, match=r"params\.yaml: not valid YAML"):
        config.load([], params_file=params)
    params.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(LmpipeError, match=r"expected a mapping of config sections, got ListConfig"):
        config.load([], params_file=params)


def test_compose_without_conf_dir_says_where_to_run(tmp_path):
    with pytest.raises(LmpipeError, match=r"config\.yaml \(run from the repository root\)"):
        config.compose([], conf_dir=tmp_path)


def test_bad_override_syntax_is_one_line():
    with pytest.raises(LmpipeError) as err:
        config.compose(["model=no-such-model"], conf_dir=CONF)
    assert "no-such-model" in str(err.value) and "\n" not in str(err.value)


# --- describe (--help) ---------------------------------------------------------------------------------------


def test_describe_shows_values_and_field_docstrings():
    cfg = config.compose(["model.n_layer=6"], conf_dir=CONF)
    text = config.describe(cfg, ["seed", "model"])
    lines = text.splitlines()
    assert lines[0] == "seed: 1337"
    assert lines[1] == "model:  (lmpipe.model_config.GPTConfig)"
    assert "  model.n_layer=6  # Number of transformer blocks." in lines
    assert "  model.pos_encoding='rotary'  # Position encoding: learned, sinusoidal or rotary." in lines
    # Fields the section leaves to the schema's default are listed too, with their doc.
    assert "  model.vocab_size (default)  # Number of token ids (the tokenizer's vocabulary size)." in lines
    assert not any("_target_" in line for line in lines[2:])


def test_field_docs_reads_attribute_docstrings():
    docs = config.field_docs(GPTConfig)
    assert docs["n_layer"] == "Number of transformer blocks."
    assert set(docs) == {f.name for f in dataclasses.fields(GPTConfig)}


# --- helpers -------------------------------------------------------------------------------------------------


def test_flatten():
    nested = {"model": {"n_layer": 4, "betas": [0.9, 0.95], "deep": {"x": None}}, "seed": 1}
    assert config.flatten(nested) == {
        "model.n_layer": 4,
        "model.betas": [0.9, 0.95],
        "model.deep.x": None,
        "seed": 1,
    }
    assert config.flatten({"a": {"b": 2}}, "final") == {"final.a.b": 2}
    assert config.flatten(3, "seed") == {"seed": 3}
    assert config.flatten(OmegaConf.create({"a": {"b": "${c}"}, "c": 5})) == {"a.b": 5, "c": 5}


def test_to_container_drops_hydra_keys_and_resolves():
    cfg = OmegaConf.create(
        {"root": 2, "s": {"_target_": "x.Y", "_partial_": True, "n": "${root}", "l": [1, {"k": "v"}]}}
    )
    out = config.to_container(cfg.s)
    assert out == {"n": 2, "l": [1, {"k": "v"}]}
    assert type(out) is dict and type(out["l"]) is list
    assert config.to_container(OmegaConf.create([1, 2])) == [1, 2]


def test_one_line():
    assert config.one_line(ValueError("first\n   second  \n\n third")) == "first second third"
    assert config.one_line(KeyError()) == "KeyError"
    assert config.one_line(RuntimeError("  \n ")) == "RuntimeError"


# --- schemas of third-party targets, read from source ----------------------------------------------------------


def test_trainer_schema_is_read_from_source_without_importing_lightning():
    import subprocess
    import sys

    code = (
        "import sys; from lmpipe import config\n"
        "schema = config.target_schema('lightning.pytorch.Trainer')\n"
        "assert not any(m.partition('.')[0] == 'lightning' for m in sys.modules), 'lightning was imported'\n"
        "print(','.join(schema.fields)); print(schema.docs['max_steps'])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    fields, max_steps_doc = proc.stdout.splitlines()

    import inspect

    from lightning.pytorch import Trainer

    assert fields.split(",") == [p for p in inspect.signature(Trainer.__init__).parameters if p != "self"]
    assert max_steps_doc == "Stop training after this number of steps."


def test_describe_shows_trainer_argument_docs():
    cfg = config.compose([], conf_dir=CONF)
    lines = config.describe(cfg, ["trainer"]).splitlines()
    assert lines[0] == "trainer:  (lightning.pytorch.Trainer)"
    assert "  trainer.num_nodes=1  # Number of GPU nodes for distributed training." in lines
    assert not any("(default)" in line for line in lines)  # Trainer's dozens of other arguments stay out


def test_target_schema_follows_re_exports_and_reports_missing_classes():
    # omegaconf/__init__.py re-exports it with a relative import; its __init__ takes nothing.
    assert config.target_schema("omegaconf.OmegaConf").fields == ()
    with pytest.raises(LmpipeError, match=r"_target_ 'lightning\.pytorch\.NoSuchTrainer' cannot be found"):
        config.target_schema("lightning.pytorch.NoSuchTrainer")
