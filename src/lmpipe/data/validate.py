"""Validate the prepared corpus with Great Expectations before anything trains on it.

`validate_corpus` runs one GE expectation suite over the corpus frame and returns a JSON-serialisable report;
`raise_for_failures` turns a failed report into one `LmpipeError` line naming the first broken expectation,
what was observed and expected, and example rows. Writing the report is the caller's job.

Two checks need a per-row value the corpus does not carry, so they run on helper columns added to a copy:
- `nontext_share`: the share of a row's characters that are not text (see `is_text_char`), checked with
  ExpectColumnValuesToBeBetween and `mostly`, so a few odd rows are tolerated but a garbled file is not.
- `repeat_of`: the doc_id of the earliest row with identical text, null for a text's first occurrence, checked
  with ExpectColumnValuesToBeNull and `mostly`. Its unexpected rate is exactly "the share of rows whose text
  repeats an earlier row" (null's denominator is every row), and its unexpected rows name the duplicate and its
  original. ExpectColumnProportionOfUniqueValuesToBeBetween gives the same rate but no rows to show;
  ExpectColumnValuesToBeUnique would also count every first occurrence.
"""

from __future__ import annotations

import os
import unicodedata
from typing import Annotated, Any

import pandas as pd
from pydantic import Field

from lmpipe.config import schema
from lmpipe.data.corpus import CORPUS_COLUMNS
from lmpipe.data.splits import SPLITS
from lmpipe.errors import LmpipeError

REQUIRED_COLUMNS = ("source", "doc_id", "group", "position", "text", "split")
"""Columns that must have a value in every row (book/chapter/verse only exist for scripture-like sources)."""
HELPER_COLUMNS = ("nontext_share", "repeat_of")
"""Computed per row on a copy of the corpus; appended after CORPUS_COLUMNS."""

# Letters (L*), combining marks (M*, accents written as separate code points), decimal digits (Nd), and
# space/line/paragraph separators (Z*); punctuation (P*) is matched by its first letter.
_TEXT_CATEGORIES = frozenset({"Lu", "Ll", "Lt", "Lm", "Lo", "Mn", "Mc", "Me", "Nd", "Zs", "Zl", "Zp"})
_TEXT_CONTROLS = frozenset("\t\n\r")

_EXAMPLES = 5
"""Example rows kept per failed expectation in the report."""
_SNIPPET = 80
"""Characters of text kept per example row in the report."""


Count = Annotated[int, Field(ge=0)]
Share = Annotated[float, Field(ge=0, le=1)]


@schema("validate")
class ValidationConfig:
    """Thresholds for the prepared-corpus checks; every check must pass for the corpus to be accepted."""

    min_chars: Count = 1
    """Shortest allowed row text, in characters."""
    max_chars: Count = 2000
    """Longest allowed row text, in characters."""
    max_duplicate_rate: Share = 0.05
    """Largest tolerated share of rows whose text exactly repeats an earlier row's text."""
    max_nontext_share: Share = 0.10
    """Per-row ceiling on the share of characters that are not letters, digits, whitespace or punctuation."""
    max_nontext_rows: Share = 0.001
    """Largest tolerated share of rows above max_nontext_share."""
    min_rows_per_split: Count = 100
    """Fewest rows each of train/val/test must hold."""
    min_docs_per_split: Count = 1
    """Fewest distinct doc_ids each of train/val/test must hold."""
    sample_rows: Annotated[int, Field(ge=1)] = 50_000
    """Most rows Great Expectations sees; a larger corpus is checked on an evenly spaced sample plus exact counts."""
    sample_chars: Annotated[int, Field(ge=1)] = 20_000_000
    """Most characters of text Great Expectations sees (its memory follows them); beyond, a sample as above."""

    def __post_init__(self) -> None:
        if self.max_chars < self.min_chars:
            raise LmpipeError(
                f"validate.max_chars={self.max_chars}: expected >= validate.min_chars={self.min_chars}"
            )


def is_text_char(ch: str) -> bool:
    """Whether one character counts as text for the non-text share.

    Text is: a Unicode letter or combining mark (categories L*, M*), a decimal digit (Nd), punctuation (P*,
    which covers quotes, dashes, brackets and the like in every script), a space/line/paragraph separator
    (Zs, Zl, Zp), or tab, newline, carriage return. Everything else is non-text: other control characters
    (Cc), format characters such as zero-width joiners or a stray BOM (Cf), private-use and unassigned code
    points (Co, Cn), surrogates (Cs), symbols (S*, which includes the replacement character U+FFFD, emoji,
    math and currency signs) and non-decimal numbers such as superscripts or fractions (No, Nl).
    """
    if ch in _TEXT_CONTROLS:
        return True
    category = unicodedata.category(ch)
    return category in _TEXT_CATEGORIES or category[0] == "P"


def nontext_share(texts: pd.Series) -> pd.Series:
    """Per row, the share of characters for which `is_text_char` is false (0.0 for ''; NaN for a non-string)."""
    strings = [t for t in texts if isinstance(t, str)]
    # A corpus uses few distinct characters, so classify each once and delete the non-text ones in C.
    nontext = {ord(ch): None for ch in set("".join(strings)) if not is_text_char(ch)}

    def share(t: Any) -> float:
        if not isinstance(t, str):
            return float("nan")
        if not t or not nontext:
            return 0.0
        return (len(t) - len(t.translate(nontext))) / len(t)

    return pd.Series([share(t) for t in texts], index=texts.index, dtype="float64")


def repeat_of(df: pd.DataFrame) -> pd.Series:
    """Per row, the doc_id of the earliest row with the same text, or None for a text's first occurrence.

    An original without a doc_id is named `row <index>`, so its repeats still count as repeats.
    """
    text = df["text"]
    first = ~text.duplicated(keep="first") | text.isna()
    names = df["doc_id"].astype(object).where(df["doc_id"].notna(), [f"row {i}" for i in df.index])
    original = names[first & text.notna()].set_axis(text[first & text.notna()])
    return text.map(original).astype(object).where(~first, None)


def validate_corpus(df: pd.DataFrame, cfg: ValidationConfig | None = None) -> dict:
    """Run the corpus expectation suite on `df`; return the report (see module docstring and `_report`).

    Never raises for bad data: a failed or un-runnable expectation is recorded with success false.
    """
    if not isinstance(df, pd.DataFrame):
        raise LmpipeError(f"validate_corpus: expected a pandas DataFrame, got {type(df).__name__}")
    cfg = cfg or ValidationConfig()
    data = df.reset_index(drop=True)  # index labels become row numbers, so GE's unexpected indexes find rows
    if "text" in data.columns:
        data["nontext_share"] = nontext_share(data["text"])
        if "doc_id" in data.columns:
            data["repeat_of"] = repeat_of(data)

    gx, gxe, context = _ephemeral_context()
    from great_expectations.expectations.row_conditions import Column

    expectations = [
        gxe.ExpectTableColumnsToMatchOrderedList(
            column_list=[*CORPUS_COLUMNS, *HELPER_COLUMNS],
            description=f"columns {', '.join(CORPUS_COLUMNS)} in this order (then helpers {', '.join(HELPER_COLUMNS)})",
        ),
        *(
            gxe.ExpectColumnValuesToNotBeNull(column=c, description=f"no nulls in {c}")
            for c in REQUIRED_COLUMNS
        ),
        gxe.ExpectColumnValueLengthsToBeBetween(
            column="text",
            min_value=cfg.min_chars,
            max_value=cfg.max_chars,
            description=f"text length in [{cfg.min_chars}, {cfg.max_chars}] chars",
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="split", value_set=list(SPLITS), description=f"split in {{{', '.join(SPLITS)}}}"
        ),
        gxe.ExpectColumnValuesToBeNull(
            column="repeat_of",
            mostly=1.0 - cfg.max_duplicate_rate,
            description=f"at most {cfg.max_duplicate_rate:.4g} of rows repeat an earlier row's text",
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="nontext_share",
            min_value=0.0,
            max_value=cfg.max_nontext_share,
            mostly=1.0 - cfg.max_nontext_rows,
            description=(
                f"non-text share <= {cfg.max_nontext_share:.4g} in all but {cfg.max_nontext_rows:.4g} of rows"
            ),
        ),
    ]
    for split in SPLITS:
        in_split = Column("split") == split
        expectations.append(
            gxe.ExpectTableRowCountToBeBetween(
                min_value=cfg.min_rows_per_split,
                row_condition=in_split,
                description=f"at least {cfg.min_rows_per_split} rows in split {split!r}",
            )
        )
        expectations.append(
            gxe.ExpectColumnUniqueValueCountToBeBetween(
                column="doc_id",
                min_value=cfg.min_docs_per_split,
                row_condition=in_split,
                description=f"at least {cfg.min_docs_per_split} distinct doc_id in split {split!r}",
            )
        )

    suite = context.suites.add(gx.ExpectationSuite(name="prepared_corpus", expectations=expectations))
    batch_definition = (
        context.data_sources.add_pandas("corpus")
        .add_dataframe_asset("corpus")
        .add_batch_definition_whole_dataframe("whole_corpus")
    )
    validation = context.validation_definitions.add(
        gx.ValidationDefinition(name="prepared_corpus", data=batch_definition, suite=suite)
    )
    result = validation.run(
        batch_parameters={"dataframe": data},
        result_format={"result_format": "SUMMARY", "partial_unexpected_count": _EXAMPLES},
    )
    return _report(data, suite, result)


def validate_file(path: str | os.PathLike, cfg: ValidationConfig | None = None) -> dict:
    """`validate_corpus` for a corpus file of any size, reading it a record batch at a time.

    Up to `cfg.sample_rows` rows and `cfg.sample_chars` characters the whole corpus goes through Great
    Expectations (the same report as `validate_corpus`). Beyond, GE checks an evenly spaced sample within both
    bounds, and the expectations that are whole-corpus counts (nulls, repeated texts, text lengths, split values,
    rows and documents per split) are replaced by exact counts made while streaming (only the column order and
    the non-text share rest on the sample); the report then carries `sample_rows`.
    """
    from lmpipe.data.corpus import iter_corpus, read_corpus

    cfg = cfg or ValidationConfig()
    counts = _StreamCounts(cfg)
    for part in iter_corpus(path):
        counts.add(part)
    if counts.rows <= cfg.sample_rows and counts.chars <= cfg.sample_chars:
        return validate_corpus(read_corpus(path), cfg)
    step = max(-(-counts.rows // cfg.sample_rows), -(-counts.chars // cfg.sample_chars))
    parts, start = [], 0
    for part in iter_corpus(path):
        parts.append(part.iloc[(-start) % step :: step])
        start += len(part)
    report = validate_corpus(pd.concat(parts), cfg)
    for entry in report["expectations"]:
        _exact(entry, counts, cfg)
    report.update(
        success=all(e["success"] for e in report["expectations"]),
        n_rows=counts.rows,
        split_counts=dict(counts.split_rows),
        sample_rows=sum(len(p) for p in parts),
    )
    return report


class _StreamCounts:
    """Whole-corpus counts made a batch at a time: rows, nulls, repeated texts (by 8-byte hash), text lengths
    out of bounds, split values out of the set, rows and documents per split."""

    def __init__(self, cfg: ValidationConfig) -> None:
        from lmpipe.data.dedup import HashSet

        self.cfg = cfg
        self.rows, self.chars, self.repeats, self.texts = 0, 0, 0, HashSet()
        self.bad_lengths, self.bad_splits = 0, 0
        self.nulls = dict.fromkeys(REQUIRED_COLUMNS, 0)
        self.split_rows: dict[str, int] = {}
        self.split_docs: dict[str, int] = {}
        self.last_doc = None

    def add(self, part: pd.DataFrame) -> None:
        from lmpipe.data.dedup import content_hashes

        self.rows += len(part)
        for column in REQUIRED_COLUMNS:
            self.nulls[column] += int(part[column].isna().sum())
        texts = part["text"].dropna()
        lengths = texts.str.len()
        self.chars += int(lengths.sum())
        self.bad_lengths += int(((lengths < self.cfg.min_chars) | (lengths > self.cfg.max_chars)).sum())
        splits = part["split"].dropna()
        self.bad_splits += int((~splits.isin(SPLITS)).sum())
        self.repeats += int((~self.texts.add(content_hashes(texts.tolist()))).sum())
        starts = part["doc_id"].ne(part["doc_id"].shift(fill_value=self.last_doc))
        for split, rows in part.groupby("split", sort=False, dropna=False):
            self.split_rows[str(split)] = self.split_rows.get(str(split), 0) + len(rows)
            self.split_docs[str(split)] = self.split_docs.get(str(split), 0) + int(starts[rows.index].sum())
        self.last_doc = part["doc_id"].iloc[-1] if len(part) else self.last_doc


def _exact(entry: dict, counts: _StreamCounts, cfg: ValidationConfig) -> None:
    """Replace a sampled entry's observation by the exact whole-corpus count where one was made."""
    kind, column = entry["expectation"], entry["column"]
    condition = entry["kwargs"].get("row_condition")
    split = condition.get("parameter") if isinstance(condition, dict) else None

    def unexpected(n: int, mostly: float = 1.0) -> None:
        entry["observed"] = {
            "unexpected_count": n,
            "element_count": counts.rows,
            "unexpected_percent": 100 * n / counts.rows,
        }
        entry["success"] = (counts.rows - n) / counts.rows >= mostly and not entry["error"]

    if kind == "expect_column_values_to_not_be_null" and column in counts.nulls:
        unexpected(counts.nulls[column])
    elif kind == "expect_column_value_lengths_to_be_between" and column == "text":
        unexpected(counts.bad_lengths)
    elif kind == "expect_column_values_to_be_in_set" and column == "split":
        unexpected(counts.bad_splits)
    elif kind == "expect_column_values_to_be_null" and column == "repeat_of":
        unexpected(counts.repeats, 1.0 - cfg.max_duplicate_rate)
    elif kind == "expect_table_row_count_to_be_between" and split:
        entry["observed"] = counts.split_rows.get(split, 0)
        entry["success"] = entry["observed"] >= cfg.min_rows_per_split and not entry["error"]
    elif kind == "expect_column_unique_value_count_to_be_between" and split:
        entry["observed"] = counts.split_docs.get(split, 0)
        entry["success"] = entry["observed"] >= cfg.min_docs_per_split and not entry["error"]


def _ephemeral_context():
    """Import GE (slow, so only here) with analytics and progress bars off; return gx, its expectations, a context."""
    # Read at import time; a caller's explicit setting wins.
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    return gx, gxe, context


def _report(data: pd.DataFrame, suite, result) -> dict:
    """Flatten GE's suite result into plain JSON types, in suite order (GE reorders results internally)."""
    order = {e.id: i for i, e in enumerate(suite.expectations)}
    results = sorted(result.results, key=lambda r: order.get(r.expectation_config.id, len(order)))
    entries = [_entry(data, r) for r in results]
    split_counts = (
        {str(k): int(v) for k, v in data["split"].value_counts(dropna=False).items()}
        if "split" in data.columns
        else {}
    )
    return {
        "success": all(e["success"] for e in entries),
        "n_rows": len(data),
        "expectations": entries,
        "split_counts": split_counts,
    }


def _entry(data: pd.DataFrame, r) -> dict:
    config = r.expectation_config
    kwargs = {k: _jsonable(v) for k, v in config.kwargs.items() if k != "batch_id"}
    info = r.exception_info or {}
    # GE puts one exception at the top level or several keyed by metric id, depending on where it was raised.
    raised = [info] if "raised_exception" in info else [v for v in info.values() if isinstance(v, dict)]
    errors = [_one_line(str(e.get("exception_message"))) for e in raised if e.get("raised_exception")]
    res = r.result or {}
    if "observed_value" in res:
        observed = _jsonable(res["observed_value"])
    elif "unexpected_count" in res:
        observed = {
            k: _jsonable(res.get(k)) for k in ("unexpected_count", "element_count", "unexpected_percent")
        }
    else:
        observed = None
    column = kwargs.get("column")
    examples = []
    for index in res.get("partial_unexpected_index_list") or []:
        row = data.loc[index]
        example = {"doc_id": _jsonable(row.get("doc_id")), "text": _snippet(row.get("text"), _SNIPPET)}
        if column and column != "text":
            example[column] = _jsonable(row.get(column))
        examples.append(example)
    return {
        "expectation": config.type,
        "column": column,
        "kwargs": kwargs,
        "expected": config.description,
        "success": bool(r.success) and not errors,
        "observed": observed,
        "error": errors[0] if errors else None,
        "unexpected_examples": examples[:_EXAMPLES],
    }


def raise_for_failures(report: dict, report_path: str | None = None) -> None:
    """Raise one-line LmpipeError for the report's first failed expectation (no-op when the report passed).

    The line names the expectation and its target, what was observed against what was expected, up to two
    example rows, and how many other expectations failed; `report_path` is where the caller saved the report.
    """
    if report["success"]:
        return
    failed = [e for e in report["expectations"] if not e["success"]]
    first = failed[0]
    message = f"data validation failed: {first['expectation']}({_target(first)}) {_observed(first)}"
    message += f", expected {first['expected']}"
    examples = first["unexpected_examples"][:2]
    if examples:
        message += ", e.g. " + ", ".join(f"{ex['doc_id']!r}: {_snippet(ex['text'], 40)!r}" for ex in examples)
    if len(failed) > 1:
        more = len(failed) - 1
        message += f"; {more} more expectation{'s' if more > 1 else ''} failed"
    if report_path:
        message += f" (see {report_path})"
    raise LmpipeError(message)


def _target(entry: dict) -> str:
    """What an expectation looked at: its column and/or its row condition (e.g. `doc_id, split=='val'`)."""
    parts = [entry["column"]] if entry["column"] else []
    condition = entry["kwargs"].get("row_condition")
    if isinstance(condition, dict) and "column" in condition:
        parts.append(f"{condition['column']['name']}{condition['operator']}{condition['parameter']!r}")
    return ", ".join(parts) or "table"


def _observed(entry: dict) -> str:
    if entry["error"]:
        return f"could not run: {entry['error']}"
    observed = entry["observed"]
    if isinstance(observed, dict) and "unexpected_count" in observed:
        return f"{observed['unexpected_count']} of {observed['element_count']} rows unexpected"
    return f"observed {observed!r}"


def _snippet(text: Any, n: int) -> str | None:
    if not isinstance(text, str):
        return None
    return text if len(text) <= n else text[:n] + "…"


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def _jsonable(value: Any) -> Any:
    """Plain JSON types for values that come out of pandas/numpy/GE (NaN and NA become None)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    if hasattr(value, "dict") and callable(value.dict):  # a GE/pydantic model such as a row condition
        return _jsonable(value.dict())
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        value = value.item()
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return None if value != value else value
    if value is pd.NA or value is pd.NaT:
        return None
    return str(value)
