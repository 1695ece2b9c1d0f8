import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto
from registry_store import open_store
from tiny_models import export_tiny_model, write_label_examples

from lmpipe.compress import PruneConfig, QuantizeConfig, prune_model, quantize_onnx
from lmpipe.errors import LmpipeError
from lmpipe.export import ExportConfig
from lmpipe.formats import CLASSIFIER_INT8_DIR
from lmpipe.inference.engine import OrtEngine
from lmpipe.inference.sampling import GenerationParams
from lmpipe.model import GPT, GPTConfig
from lmpipe.stage import cpu_flags

VOCAB, N_EMBD = 512, 128


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(root, fp32 export dir), exported once for the module."""
    root = tmp_path_factory.mktemp("compress")
    # A small GPT (vocab 512, width 128: big enough that int8 weights dominate the file) with weights drawn
    # at std 0.1, so its predictions depend on the context.
    export_tiny_model(
        root,
        root / "onnx" / "tiny",
        ExportConfig(parity_decode_steps=2),
        variant_name="tiny",
        pos_encoding="rotary",
        seed=0,
        std=0.1,
        vocab_size=VOCAB,
        n_head=4,
        n_embd=N_EMBD,
        mlp_ratio=2,  # an MLP width other than VOCAB, so the tied matrix is the only one of its shape
    )
    return root, root / "onnx" / "tiny"


@pytest.fixture(scope="module")
def dynamic(exported):
    root, src = exported
    dst = root / "onnx" / "tiny-int8"
    return dst, quantize_onnx(src, dst, QuantizeConfig(variants=["tiny"]), None)


def random_batch(seed: int, batch: int = 4, length: int = 48) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = np.random.default_rng(seed).integers(0, VOCAB, (batch, length))
    positions = np.broadcast_to(np.arange(length), ids.shape)
    return ids, positions, np.ones_like(ids)


def top1_agreement(fp32_dir, int8_dir, seed: int = 0) -> float:
    """Share of positions (prefill of a random batch, then 4 cached decode steps) whose argmax matches fp32."""
    engines = [OrtEngine(fp32_dir, threads=1), OrtEngine(int8_dir, threads=1)]
    ids, positions, mask = random_batch(seed)
    outs = [e.forward(ids, positions, mask) for e in engines]
    agree = [outs[0][0].argmax(-1) == outs[1][0].argmax(-1)]
    tokens = np.random.default_rng(seed + 1).integers(0, VOCAB, (4, ids.shape[0], 1))
    for step, token in enumerate(tokens):
        mask = np.ones((ids.shape[0], ids.shape[1] + step + 1), dtype=np.int64)
        pos = np.full((ids.shape[0], 1), ids.shape[1] + step)
        outs = [e.forward(token, pos, mask, past) for e, (_, past) in zip(engines, outs, strict=True)]
        agree.append(outs[0][0].argmax(-1) == outs[1][0].argmax(-1))
    return float(np.mean(np.concatenate([a.ravel() for a in agree])))


def initializers(path) -> list[tuple[str, int, tuple[int, ...]]]:
    graph = onnx.load(path).graph
    return [(i.name, i.data_type, tuple(i.dims)) for i in graph.initializer]


def test_dynamic_int8_is_under_a_third_of_fp32_and_agrees_with_it(exported, dynamic):
    _, src = exported
    dst, report = dynamic
    assert report["src_bytes"] == (src / "model.onnx").stat().st_size
    assert report["dst_bytes"] == (dst / "model.onnx").stat().st_size
    assert report["ratio"] == pytest.approx(report["dst_bytes"] / report["src_bytes"])
    assert report["ratio"] <= 0.35
    assert top1_agreement(src, dst) >= 0.88  # seeds 0-5 gave 0.90-0.94: random weights have near-ties


def test_tied_embedding_is_stored_once_as_int8_and_the_file_is_self_contained(dynamic):
    dst, _ = dynamic
    inits = initializers(dst / "model.onnx")
    big = [(dtype, dims) for _, dtype, dims in inits if len(dims) == 2 and VOCAB in dims]
    assert big == [(TensorProto.INT8, (N_EMBD, VOCAB))]
    # Every weight matrix is int8; only vectors (biases, LayerNorm, scales) and the fused graph's rotary
    # cos/sin tables (block_size x head_dim / 2, no MatMul reads them) stay float.
    float_matrices = [name for name, dtype, dims in inits if len(dims) == 2 and dtype == TensorProto.FLOAT]
    assert sorted(float_matrices) == ["rotary_cos", "rotary_sin"]
    assert not any(i.external_data for i in onnx.load(dst / "model.onnx").graph.initializer)
    assert sorted(p.name for p in dst.iterdir()) == [
        "config.json",
        "model.onnx",
        "parity.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


def test_quantized_dir_has_updated_config_and_loads_and_generates_in_the_engine(exported, dynamic):
    _, src = exported
    dst, _ = dynamic
    config = json.loads((dst / "config.json").read_text())
    source = json.loads((src / "config.json").read_text())
    assert config["quantization"] == "dynamic-int8" and source["quantization"] == "none"
    assert config["variant"] == "tiny-int8" and config["quantized_from"] == str(src)
    assert {
        k: v
        for k, v in config.items()
        if k not in ("quantization", "variant", "quantized_from", "per_channel")
    } == {k: v for k, v in source.items() if k not in ("quantization", "variant")}
    meta = {p.key: p.value for p in onnx.load(dst / "model.onnx").metadata_props}
    assert json.loads(meta["lmpipe_config"]) == config

    engine = OrtEngine(dst, threads=1)
    assert engine.name == "tiny-int8"
    params = GenerationParams(max_new_tokens=6)
    out = engine.generate_ids([[10, 20, 30], [7, 8]], params)
    assert len(out) == 2 and all(0 < len(ids) <= 6 for ids in out)
    assert all(0 <= t < VOCAB for ids in out for t in ids)


def test_static_and_per_channel_quantization_agree_with_fp32(exported, tmp_path):
    _, src = exported
    tokens = np.random.default_rng(5).integers(0, VOCAB, 2000)
    static = QuantizeConfig(variants=["tiny"], method="static", calibration_windows=8)
    report = quantize_onnx(src, tmp_path / "static", static, tokens)
    assert report["ratio"] <= 0.35
    assert json.loads((tmp_path / "static" / "config.json").read_text())["quantization"] == "static-int8"
    assert top1_agreement(src, tmp_path / "static") >= 0.85  # seeds 0-5 gave 0.89-0.92

    per_channel = QuantizeConfig(variants=["tiny"], per_channel=True)
    report = quantize_onnx(src, tmp_path / "per-channel", per_channel, None)
    assert report["ratio"] <= 0.35  # per-vocabulary-entry scales: the tied matrix is still shared
    # Without VNNI, ONNX Runtime's u8s8 kernels can saturate (its docs: vpmaddubsw), and per-channel scales use
    # the whole int8 range: 0.80 on an AVX2-only EPYC against >= 0.88 on AVX-512-VNNI machines.
    assert top1_agreement(src, tmp_path / "per-channel") >= (0.88 if _has_vnni() else 0.75)


def _has_vnni() -> bool:
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def test_quantize_errors_leave_the_destination_untouched(exported, dynamic, tmp_path):
    _, src = exported
    dst, _ = dynamic
    static = QuantizeConfig(variants=["tiny"], method="static")
    with pytest.raises(LmpipeError, match="method='static' needs calibration tokens"):
        quantize_onnx(src, tmp_path / "out", static, None)
    with pytest.raises(LmpipeError, match="id 600 is outside the vocab"):
        quantize_onnx(src, tmp_path / "out", static, np.full(200, 600))
    with pytest.raises(LmpipeError, match="expected an fp32 export"):
        quantize_onnx(dst, tmp_path / "out", QuantizeConfig(), None)
    with pytest.raises(LmpipeError, match="missing .*model.onnx"):
        quantize_onnx(tmp_path / "nothing", tmp_path / "out", QuantizeConfig(), None)
    assert not (tmp_path / "out").exists()


def test_quantize_stage_writes_the_variants_and_the_classifier(
    exported, onnx_classifier, tmp_path, mlflow_template_db, monkeypatch
):
    import importlib.util

    from omegaconf import OmegaConf

    monkeypatch.chdir(tmp_path)  # git lookups and relative paths stay out of the repository
    spec = importlib.util.spec_from_file_location(
        "stage_quantize", Path(__file__).resolve().parents[1] / "pipelines" / "quantize.py"
    )
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    shutil.copytree(exported[1], tmp_path / "onnx" / "tiny")
    shutil.copytree(onnx_classifier[1], tmp_path / "encoder" / "onnx")
    paths = {
        "onnx": str(tmp_path / "onnx"),
        "encoder": str(tmp_path / "encoder"),
        "instructions": str(write_label_examples(tmp_path / "instructions")),
        "tokens": str(tmp_path / "tokens"),
        "metrics": str(tmp_path / "metrics"),
    }
    for uri, _ in open_store(tmp_path, mlflow_template_db, monkeypatch):
        logger = {"_target_": "lmpipe.tracking.TrackingConfig", "tracking_uri": uri, "experiment_name": "q"}
        logger["artifact_location"] = str(tmp_path / "art")
        quantize = {"_target_": "lmpipe.compress.QuantizeConfig", "variants": ["tiny"]}
        cfg = OmegaConf.create({"paths": paths, "quantize": quantize, "logger": logger})
        # Without the classifier's ONNX export the stage stops before writing anything.
        shutil.move(tmp_path / "encoder" / "onnx", tmp_path / "elsewhere")
        with pytest.raises(LmpipeError, match=r"missing .*onnx/model.onnx: .*encoder.export_onnx=true"):
            stage.main(cfg)
        assert not (tmp_path / "onnx" / "tiny-int8").exists() and not (tmp_path / "metrics").exists()
        shutil.move(tmp_path / "elsewhere", tmp_path / "encoder" / "onnx")
        stage.main(cfg)
    report = json.loads((tmp_path / "metrics" / "quantize.json").read_text())
    assert set(report) == {"tiny", "classifier"} and report["tiny"]["ratio"] < 0.35
    agreement = report["classifier"]["agreement"]
    assert agreement["texts"] == 3 and set(agreement["tasks"]) == {"testament", "book"}
    config = json.loads((tmp_path / "onnx" / CLASSIFIER_INT8_DIR / "config.json").read_text())
    assert config["quantization"] == "dynamic-int8" and config["agreement"] == agreement


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"variants": []}, r"quantize.variants=\[\]: expected List should have at least 1 item"),
        ({"variants": "teacher"}, "quantize.variants='teacher'"),
        ({"variants": ["a", "a"]}, "expected each name once"),
        ({"method": "qat"}, "quantize.method='qat': expected 'dynamic' or 'static'"),
        ({"per_channel": "yes"}, "quantize.per_channel='yes'"),
        (
            {"calibration_windows": 0},
            "quantize.calibration_windows=0: expected a value greater than or equal to 1",
        ),
    ],
)
def test_quantize_config_validation(kwargs, message):
    with pytest.raises(LmpipeError, match=message):
        QuantizeConfig(**kwargs)


# --- pruning ----------------------------------------------------------------------------------------------------


def small_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=24, dropout=0.0)
    return GPT(cfg).eval()


LINEARS = [
    f"blocks.{i}.{name}.weight"
    for i in range(2)
    for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
]


@pytest.mark.parametrize("method", ["unstructured", "rows"])
def test_pruning_reaches_the_requested_sparsity_and_leaves_the_tied_embedding(method):
    model = small_gpt()
    embedding = model.wte.weight.detach().clone()
    keys = set(model.state_dict())
    report = prune_model(model, PruneConfig(sparsity=0.3, method=method))

    assert sorted(report["layers"]) == sorted(LINEARS)
    params = dict(model.named_parameters())
    for name, sparsity in report["layers"].items():
        weight = params[name].detach()
        # torch prunes round(amount * n) weights (unstructured) or rows (rows).
        n = weight.numel() if method == "unstructured" else weight.shape[0]
        expected = round(0.3 * n) / n
        assert sparsity == pytest.approx(expected) == pytest.approx(float((weight == 0).float().mean()))
        if method == "rows":
            zero_rows = (weight == 0).all(dim=1)
            assert int(zero_rows.sum()) == round(0.3 * weight.shape[0])
            # The survivors are the rows with the largest L2 norm.
            norms = weight.norm(dim=1)
            assert bool((norms[~zero_rows] > 0).all())
    total = sum(params[n].numel() for n in LINEARS)
    assert report["pruned_parameters"] == total
    assert report["overall"] == pytest.approx(report["zeroed"] / total)
    assert 0.29 <= report["overall"] <= 0.31

    assert torch.equal(model.wte.weight, embedding) and model.lm_head.weight is model.wte.weight
    assert set(model.state_dict()) == keys  # prune.remove: no weight_orig / weight_mask left behind
    with torch.no_grad():
        logits = model(torch.randint(0, 97, (2, 10))).logits
    assert logits.shape == (2, 10, 97) and bool(torch.isfinite(logits).all())


def test_rows_pruning_zeroes_the_rows_with_the_smallest_norm():
    model = small_gpt(1)
    before = model.blocks[0].mlp.c_fc.weight.detach().clone()
    prune_model(model, PruneConfig(sparsity=0.5, method="rows"))
    after = model.blocks[0].mlp.c_fc.weight.detach()
    smallest = before.norm(dim=1).argsort()[: before.shape[0] // 2]
    assert bool((after[smallest] == 0).all())
    kept = torch.ones(before.shape[0], dtype=torch.bool)
    kept[smallest] = False
    assert torch.equal(after[kept], before[kept])


def test_pruning_the_embeddings_keeps_the_tie_and_zero_sparsity_changes_nothing():
    model = small_gpt()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = prune_model(model, PruneConfig(sparsity=0.0))
    assert report["zeroed"] == 0 and report["overall"] == 0.0
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    report = prune_model(model, PruneConfig(sparsity=0.5, skip_embeddings=False))
    assert report["layers"]["lm_head.weight"] == pytest.approx(0.5, abs=1e-3)
    assert model.lm_head.weight is model.wte.weight
    assert float((model.wte.weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity": 1.0}, r"prune.sparsity=1.0: expected a value less than 1"),
        ({"sparsity": -0.1}, "prune.sparsity=-0.1"),
        ({"sparsity": True}, "prune.sparsity=True"),
        ({"method": "heads"}, "prune.method='heads': expected 'unstructured' or 'rows'"),
        ({"source": ""}, "prune.source=''"),
        ({"skip_embeddings": 1}, "prune.skip_embeddings=1"),
    ],
)
def test_prune_config_validation(kwargs, message):
    with pytest.raises(LmpipeError, match=message):
        PruneConfig(**kwargs)
