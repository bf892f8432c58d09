"""Read records from data.path: a file, a folder, a glob, or "hub:owner/name".

Local files:
- ``.txt``: the whole file is one document (a record that is a plain ``str``);
- ``.jsonl``: one JSON object per line (blank lines are ignored);
- ``.json``: a list of objects, or one object (JSON lines in a ``.json`` file also work);
- ``.parquet``: one record per row.
A folder is searched recursively for these suffixes; a glob (``*``, ``?``, ``[``) is expanded
with ``**`` support. Files are read in sorted order, so the record order is deterministic.

"hub:owner/name" loads split data.split with `datasets.load_dataset`; data.streaming = true
reads the rows as they arrive instead of downloading the whole dataset first (the rows read
are still tokenized and cached like local data, so the training set stays map-style).

Every record comes with a ``where`` string (``file:line``, ``file item i``, ``file row i`` or
``hub:name[split] row i``) for messages. Records that cannot be read (malformed JSON, bytes
that are not UTF-8) are dropped through `Report`, which warns with ``where`` and counts them;
with ``data.strict = true`` they raise `DataError` instead.
"""
from __future__ import annotations

import glob
import io
import json
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator, Union

from harness.data import DataError, logger

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
HUB_PREFIX = "hub:"
WARNINGS_PER_REASON = 10  # then the reason is only counted, so a broken file cannot flood the log

Record = Union[dict, str]  # a JSON object / table row, or the text of a .txt file


class Report:
    """Counts records read and dropped from one source, warning with file:line for each drop.

    `key` and `value` name the setting that chose the source (e.g. "data.path", "books/"),
    `noun` what a record is ("documents", "conversations").
    """

    def __init__(self, key: str, value: str, *, strict: bool = False, noun: str = "documents"):
        self.key, self.value, self.strict, self.noun = key, value, strict, noun
        self.records = 0
        self.skipped: Counter[str] = Counter()
        self.notes: dict[str, str] = {}  # reason -> detail for the nothing-left error
        self.hints: dict[str, str] = {}  # reason -> how to fix it

    def bad(self, reason: str, where: str, detail: str, hint: str) -> None:
        """An unreadable record: an error under data.strict, else warned about and dropped."""
        if self.strict:
            raise DataError(f"{where}: {detail}; {hint} (or set data.strict = false to skip such records)")
        self.drop(reason, where, detail, hint)

    def drop(self, reason: str, where: str, detail: str, hint: str = "") -> None:
        """Drop one record for `reason`, warning with its location (the first few per reason)."""
        self.skipped[reason] += 1
        self.hints.setdefault(reason, hint)
        count = self.skipped[reason]
        if count <= WARNINGS_PER_REASON:
            logger.warning("%s: %s; skipped%s", where, detail, f" ({hint})" if hint else "")
        if count == WARNINGS_PER_REASON:
            logger.warning("%s = %r: further records skipped as %r are counted, not shown",
                           self.key, self.value, reason)

    def drop_many(self, reason: str, count: int, note: str, hint: str) -> None:
        """Drop `count` records at once for a filter (e.g. min_tokens), with one warning."""
        if count == 0:
            return
        self.skipped[reason] += count
        self.notes[reason], self.hints[reason] = note, hint
        logger.warning("%s = %r: skipped %d %s %s %s (%s)", self.key, self.value, count, self.noun, reason, note, hint)

    def log_summary(self, kept: int) -> None:
        if self.skipped:
            logger.warning("%s = %r: kept %d of %d %s; skipped %s", self.key, self.value, kept, self.records,
                           self.noun, self._counts())

    def nothing_left(self) -> DataError:
        """The error for a source that every record was filtered out of, naming the filters."""
        if not self.records:
            return DataError(f"{self.key} = {self.value!r} holds no {self.noun}")
        hints = "; ".join(dict.fromkeys(hint for reason in self.skipped if (hint := self.hints.get(reason))))
        return DataError(f"0 of {self.records} {self.noun} left in {self.key} = {self.value!r}: "
                         f"{self._counts()}" + (f"; {hints}" if hints else ""))

    def _counts(self) -> str:
        return ", ".join(f"{count} {reason}" + (f" {self.notes[reason]}" if reason in self.notes else "")
                         for reason, count in self.skipped.items())


def iter_records(path: str, report: Report, *, split: str = "train", streaming: bool = False
                 ) -> Iterator[tuple[str, Record]]:
    """Yield (where, record) for every readable record of `path`; counts into `report`."""
    if path.startswith(HUB_PREFIX):
        readers = [_hub_rows(path[len(HUB_PREFIX):], split, streaming, report)]
    else:
        readers = [_file_records(file, report) for file in resolve_files(path, report.key)]
    for reader in readers:
        for where, record in reader:
            report.records += 1
            if record is not None:  # None: unreadable, already reported
                yield where, record


def resolve_files(path: str, key: str) -> list[Path]:
    """The data files that `path` names: itself, those in the folder, or the glob's matches."""
    given = Path(path).expanduser()
    if given.is_file():
        if given.suffix not in SUFFIXES:
            raise DataError(f"{key} = {path!r}: unsupported file type {given.suffix!r}; use {_suffix_list()}")
        return [given]
    if given.is_dir():
        candidates = sorted(p for p in given.rglob("*") if p.is_file() and not _hidden(p.relative_to(given)))
    elif any(ch in path for ch in "*?["):
        candidates = sorted(Path(p) for p in glob.glob(str(given), recursive=True) if Path(p).is_file())
    elif given.exists():
        raise DataError(f"{key} = {path!r} is not a regular file or a folder (a FIFO, a device or a socket): give a "
                        f"file, a folder or a glob of {_suffix_list()} files")
    elif given.is_symlink():
        raise DataError(f"{key} = {path!r} is a symbolic link that leads nowhere (a loop, or a missing target): "
                        f"point it at the data, or give the data's own path")
    else:
        raise DataError(f"{key} = {path!r} does not exist; give a file, a folder or a glob of {_suffix_list()} "
                        f"files, or \"hub:owner/name\" for a hub dataset")
    files = [p for p in candidates if p.suffix in SUFFIXES]
    ignored = [p for p in candidates if p.suffix not in SUFFIXES]
    if ignored:
        names = ", ".join(str(p) for p in ignored[:5]) + (", ..." if len(ignored) > 5 else "")
        logger.warning("%s = %r: ignoring %d files that are not %s: %s", key, path, len(ignored), _suffix_list(), names)
    if not files:
        raise DataError(f"{key} = {path!r} matches no {_suffix_list()} files")
    return files


def _suffix_list() -> str:
    return ", ".join(SUFFIXES)


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _file_records(file: Path, report: Report) -> Iterator[tuple[str, Record | None]]:
    if file.suffix == ".txt":
        return _txt_records(file, report)
    if file.suffix == ".jsonl":
        return _jsonl_file(file, report)
    if file.suffix == ".json":
        return _json_records(file, report)
    return _parquet_rows(file)


def _txt_records(file: Path, report: Report) -> Iterator[tuple[str, Record | None]]:
    raw = file.read_bytes()
    text = _decode(raw, file, 1, report)
    yield f"{file}:1", text


def _decode(raw: bytes, file: Path, first_line: int, report: Report) -> str | None:
    """`raw` as UTF-8 (a leading BOM dropped), or None after reporting the first bad byte."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = first_line + raw.count(b"\n", 0, error.start)
        column = error.start - (raw.rfind(b"\n", 0, error.start) + 1) + 1
        report.bad("non-UTF-8", f"{file}:{line}", f"byte 0x{raw[error.start]:02x} at column {column} is not UTF-8",
                   "re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8")
        return None


def _jsonl_file(file: Path, report: Report) -> Iterator[tuple[str, Record | None]]:
    with open(file, "rb") as handle:  # line by line: JSON lines files can be larger than memory
        yield from _jsonl_records(file, handle, report)


def _jsonl_records(file: Path, lines: Iterable[bytes], report: Report) -> Iterator[tuple[str, Record | None]]:
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        where = f"{file}:{number}"
        line = _decode(raw, file, number, report)
        yield where, None if line is None else _parse_object(line, where, report)


def _parse_object(line: str, where: str, report: Report) -> dict | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        report.bad("malformed JSON", where, f"malformed JSON ({error.msg} at column {error.colno})",
                   "fix or delete the malformed lines")
        return None
    if not isinstance(record, dict):
        report.bad("malformed JSON", where, f"expected a JSON object, got a JSON {type(record).__name__}",
                   "write one {...} object per line")
        return None
    return record


def _json_records(file: Path, report: Report) -> Iterator[tuple[str, Record | None]]:
    raw = file.read_bytes()
    text = _decode(raw, file, 1, report)
    if text is None:
        yield f"{file}:1", None
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # several values: JSON lines in a .json file
            yield from _jsonl_records(file, io.BytesIO(raw), report)
            return
        report.bad("malformed JSON", f"{file}:{error.lineno}", f"malformed JSON ({error.msg} at column {error.colno})",
                   "fix the file")
        yield f"{file}:{error.lineno}", None
        return
    items = data if isinstance(data, list) else [data]
    for index, item in enumerate(items):
        where = f"{file} item {index}"
        if isinstance(item, dict):
            yield where, item
        else:
            report.bad("malformed JSON", where, f"expected a JSON object, got a JSON {type(item).__name__}",
                       "make the file a list of {...} objects")
            yield where, None


def _parquet_rows(file: Path) -> Iterator[tuple[str, Record]]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
    except pyarrow.ArrowInvalid as error:  # empty, truncated or not parquet at all
        size = file.stat().st_size
        raise DataError(f"{file}: not a readable parquet file ({size:,} bytes: {error}). Re-export it, or remove it "
                        f"from the data folder") from None
    index = 0
    for batch in parquet.iter_batches():
        for row in batch.to_pylist():
            yield f"{file} row {index}", row
            index += 1


def _hub_rows(name: str, split: str, streaming: bool, report: Report) -> Iterator[tuple[str, Record]]:
    import datasets

    try:
        rows = datasets.load_dataset(name, split=split, streaming=streaming)
    except Exception as error:  # network, authentication, unknown id or split: one clear message for all
        raise DataError(
            f"{report.key} = {report.value!r}: could not load hub dataset {name!r} (split {split!r}): {error}. "
            f"Check the id, the split (data.split) and the network, or download the files and point "
            f"{report.key} at them"
        ) from error
    for index, row in enumerate(rows):
        yield f"hub:{name}[{split}] row {index}", row
