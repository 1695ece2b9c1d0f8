"""lmpipe.atomic: outputs replace their target all-or-nothing and leave no temporary files behind."""

import json
from pathlib import Path

import numpy as np
import pytest

from lmpipe import atomic


def listing(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` (hidden ones included) with its bytes (None for directories)."""
    return {
        str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes())
        for p in sorted(folder.rglob("*"))
    }


class Boom(Exception):
    pass


def test_file_is_replaced_on_success(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old", encoding="utf-8")
    with atomic.atomic_path(target) as tmp:
        assert tmp.parent.parent == tmp_path and tmp.name == "out.txt"
        assert tmp.parent.name.startswith(".out.txt.") and tmp.parent.name.endswith(".tmp")
        tmp.write_text("new", encoding="utf-8")
        assert target.read_text(encoding="utf-8") == "old"  # nothing visible until the block succeeds
    assert listing(tmp_path) == {"out.txt": b"new"}


def test_file_target_and_parents_are_created(tmp_path):
    target = tmp_path / "a" / "b" / "out.bin"
    with atomic.atomic_path(target) as tmp:
        tmp.write_bytes(b"\x00\x01")
    assert listing(tmp_path) == {"a": None, "a/b": None, "a/b/out.bin": b"\x00\x01"}


def test_file_is_untouched_on_error(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old", encoding="utf-8")
    with pytest.raises(Boom), atomic.atomic_path(target) as tmp:
        tmp.write_text("half-writ", encoding="utf-8")
        raise Boom
    assert listing(tmp_path) == {"out.txt": b"old"}


def test_directory_is_swapped_on_success(tmp_path):
    target = tmp_path / "prepared"
    target.mkdir()
    (target / "stale.txt").write_text("stale", encoding="utf-8")
    (target / "corpus.parquet").write_text("old", encoding="utf-8")
    with atomic.atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "corpus.parquet").write_text("new", encoding="utf-8")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x").write_text("x", encoding="utf-8")
    # The old directory is replaced as a whole (its stale file is gone), not merged into or nested.
    assert listing(tmp_path) == {
        "prepared": None,
        "prepared/corpus.parquet": b"new",
        "prepared/sub": None,
        "prepared/sub/x": b"x",
    }


def test_new_directory_is_created(tmp_path):
    with atomic.atomic_path(tmp_path / "models" / "pretrain") as tmp:
        tmp.mkdir()
        (tmp / "model.pt").write_bytes(b"weights")
    assert listing(tmp_path) == {
        "models": None,
        "models/pretrain": None,
        "models/pretrain/model.pt": b"weights",
    }


def test_directory_is_untouched_on_error(tmp_path):
    target = tmp_path / "prepared"
    target.mkdir()
    (target / "corpus.parquet").write_text("old", encoding="utf-8")
    before = listing(tmp_path)
    with pytest.raises(Boom), atomic.atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "corpus.parquet").write_text("partial", encoding="utf-8")
        raise Boom
    assert listing(tmp_path) == before


def test_nothing_written_is_an_error_and_keeps_the_target(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old", encoding="utf-8")
    with pytest.raises(RuntimeError, match="nothing was written"), atomic.atomic_path(target):
        pass
    assert listing(tmp_path) == {"out.txt": b"old"}


def test_nested_atomic_writes_land_inside_the_staged_directory(tmp_path):
    # prepare writes stats.json atomically inside the directory it is itself staging.
    target = tmp_path / "prepared"
    with atomic.atomic_path(target) as tmp:
        tmp.mkdir()
        atomic.write_json(tmp / "stats.json", {"rows": 3})
    assert listing(tmp_path) == {"prepared": None, "prepared/stats.json": b'{\n  "rows": 3\n}\n'}


def test_write_text_is_utf8(tmp_path):
    target = tmp_path / "samples.txt"
    atomic.write_text(target, "Ève — “quoted” ✓\n")
    assert target.read_bytes() == "Ève — “quoted” ✓\n".encode()
    assert listing(tmp_path) == {"samples.txt": target.read_bytes()}


def test_write_json_is_sorted_and_handles_numpy_scalars(tmp_path):
    target = tmp_path / "metrics.json"
    atomic.write_json(
        target,
        {
            "b": np.float32(0.5),
            "a": {"z": np.int64(7), "y": np.bool_(True)},
            "c": [np.float64(1.25), 2],
            "path": Path("data/prepared"),
        },
    )
    text = target.read_text(encoding="utf-8")
    assert text.endswith("}\n")
    assert json.loads(text) == {"a": {"y": True, "z": 7}, "b": 0.5, "c": [1.25, 2], "path": "data/prepared"}
    assert [line.strip().split(":")[0] for line in text.splitlines() if line.startswith('  "')] == [
        '"a"',
        '"b"',
        '"c"',
        '"path"',
    ]
    assert text.index('"y"') < text.index('"z"')
    assert type(json.loads(text)["a"]["z"]) is int


def test_write_json_rejects_unserialisable_values_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("{}\n", encoding="utf-8")
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        atomic.write_json(target, {"x": object()})
    assert listing(tmp_path) == {"metrics.json": b"{}\n"}
