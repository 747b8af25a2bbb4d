"""Reading a batch job's input: parquet, jsonl/json or csv; a file, a folder or a glob; local or any filesystem
pyarrow knows (s3://, gs://, ...).

The files are read by Ray Data read tasks (``InputFiles``, a Ray Data file datasource), block by block, so the
data streams from storage to the model actors and never passes through the driver. Each row carries where it came
from: ``source_file`` (its file, relative to the input) and ``source_row`` (its row number in that file, from 0).
Together they name a row stably across runs, which is what ``--resume`` keys on when no id column is given. JSON
rows are typed with one schema for every block (see ``InputFiles``): a malformed row gets its own error and cannot
fail the read.
"""

from __future__ import annotations

import csv
import fnmatch
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.datasource import FileBasedDatasource

from jobs import storage

FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
TYPE_ERRORS = "_input_error"  # set by the reader for rows it could not type; dropped from the output
SOURCE_FILE, SOURCE_ROW = "source_file", "source_row"
BLOCK_ROWS = 1024  # rows per block a read task yields at most
BLOCK_BYTES = 16 << 20  # and bytes of JSON text per block at most
PEEK_ROWS = 64  # rows the driver reads to check the input's columns
_CHUNK = 1 << 20  # bytes read at a time from a JSON lines file


class Listing(NamedTuple):
    files: list[str]
    fs: pafs.FileSystem
    fmt: str
    root: str  # the folder that source_file names are relative to


def list_input_files(path: str) -> Listing:
    """A file, a folder (every supported file below it) or a glob -> its files, their filesystem and format."""
    pattern = None
    if any(c in path for c in "*?["):
        cut = min(path.index(c) for c in "*?[" if c in path)
        path, pattern = path[: path.rfind("/", 0, cut) + 1] or ".", path
    fs, root = storage.resolve(path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {path!r} does not exist")
    if info.type == pafs.FileType.File:
        files, root = [root], os.path.dirname(root)
    else:
        found = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        files = sorted(f.path for f in found if f.type == pafs.FileType.File and Path(f.path).suffix in FORMATS)
    if pattern:
        local = pattern if "://" not in pattern else pattern.split("://", 1)[1]
        files = [f for f in files if fnmatch.fnmatch(f, os.path.abspath(local) if "://" not in pattern else local)]
    if not files:
        raise FileNotFoundError(f"input {pattern or path!r} holds no .parquet, .jsonl or .csv files")
    formats = {FORMATS[Path(f).suffix] for f in files}
    if len(formats) > 1:
        raise ValueError(f"input {path!r} mixes formats {sorted(formats)}; give one kind of file")
    return Listing(files, fs, formats.pop(), root)


class InputFiles(FileBasedDatasource):
    """The input files as a Ray Data datasource: each read task streams its files in blocks of ``BLOCK_ROWS`` rows,
    each row tagged with ``source_file`` and ``source_row``.

    JSON has no schema, and read tasks type their blocks independently, so blocks could disagree (a column of
    strings in one, of objects in the next) and fail the job where they meet. So every JSON block is typed with one
    schema, made here from ``types`` (the columns the job reads, with the types it needs) and from the first rows of
    the input for the other columns. A value that does not fit its column's type becomes null and its row carries
    the reason (that row gets an error, not the job), except in a column of text that the job does not read, where
    it is kept as JSON text; so are a column the first rows do not have and a column of objects or lists that the
    job does not read.
    """

    def __init__(self, listing: Listing, first: pa.Table, types: dict[str, pa.DataType] | None = None):
        """``first``: the input's first rows (``peek``); ``types``: the types of the columns the job reads."""
        files, fs, self.fmt, self.root = listing
        fields = {f.name: pa.field(f.name, pa.string() if _as_text_type(f.type, self.fmt) else f.type)
                  for f in first.schema}
        if self.fmt == "json":
            fields.update({k: pa.field(k, t, metadata={"read": "1"}) for k, t in (types or {}).items()})
        self.schema = pa.schema([f for k, f in fields.items() if k != TYPE_ERRORS])  # the output keeps these
        self._json_schema = self.schema if self.fmt == "json" else None
        self.block_rows = BLOCK_ROWS
        super().__init__(files, filesystem=fs)

    def _open_input_source(self, filesystem, path, **open_args):
        if self.fmt == "parquet":  # parquet reads its footer first: it needs a file it can seek in
            return filesystem.open_input_file(path)
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        yield from tagged_blocks(f, path, self.fmt, self.root, self.block_rows, self._json_schema)


def tagged_blocks(f, path: str, fmt: str, root: str, rows: int = BLOCK_ROWS,
                  schema: pa.Schema | None = None) -> Iterator[pa.Table]:
    """The blocks of one open file (of at most ``rows`` rows), each with its rows' ``source_file`` and
    ``source_row``."""
    name = os.path.relpath(path, root) if root else os.path.basename(path)
    start = 0
    for block in _blocks(f, path, fmt, rows, schema):
        n = block.num_rows
        yield (block.append_column(SOURCE_FILE, pa.array([name] * n, pa.string()))
               .append_column(SOURCE_ROW, pa.array(range(start, start + n), pa.int64())))
        start += n


def _blocks(f, path: str, fmt: str, rows: int, schema: pa.Schema | None) -> Iterator[pa.Table]:
    if fmt == "parquet":
        for batch in pq.ParquetFile(f).iter_batches(batch_size=rows):
            yield pa.Table.from_batches([batch])
    elif fmt == "csv":
        for batch in _csv_batches(f):  # blocks of about 1 MiB of text
            yield pa.Table.from_batches([batch])
    else:
        block, size = [], 0
        for row, n_bytes in json_rows(f, os.path.basename(path)):
            block.append(row)
            size += n_bytes
            if len(block) == rows or size >= BLOCK_BYTES:
                yield rows_to_table(block, schema)
                block, size = [], 0
        if block:
            yield rows_to_table(block, schema)


def _csv_batches(f) -> Iterator[pa.RecordBatch]:
    """A CSV file's blocks, every column as text (null where a cell is empty). CSV has no types, and pyarrow would
    fix each column's type from the first block: a column empty there and numeric further on (a per-row max_tokens)
    would fail the whole read. The job types the columns it reads row by row, so a bad cell is its row's error."""
    head, rest = _csv_header(f)
    names = next(csv.reader([head.decode("utf-8-sig")]), [])
    options = pacsv.ConvertOptions(column_types=dict.fromkeys(names, pa.string()), strings_can_be_null=True)
    yield from pacsv.open_csv(_Replay(head + rest, f), convert_options=options)


def _csv_header(f) -> tuple[bytes, bytes]:
    """(the header line with its newline, the bytes read after it): the first newline outside double quotes."""
    data, quoted, scanned = b"", False, 0
    while True:
        chunk = f.read(1 << 16)
        data += chunk
        for i in range(scanned, len(data)):
            if data[i] == 0x22:  # a quote; "" inside quotes toggles twice
                quoted = not quoted
            elif data[i] == 0x0A and not quoted:
                return data[: i + 1], data[i + 1 :]
        scanned = len(data)
        if not chunk:
            return data, b""


class _Replay:
    """A file object that gives ``head`` and then the rest of ``f``."""

    closed = False

    def __init__(self, head: bytes, f):
        self.head, self.f = head, f

    def read(self, n: int = -1) -> bytes:
        if self.head:
            out, self.head = (self.head, b"") if n is None or n < 0 or n >= len(self.head) else \
                (self.head[:n], self.head[n:])
            return out
        return self.f.read() if n is None or n < 0 else self.f.read(n)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True


def peek(listing: Listing) -> pa.Table:
    """The input's first rows (read here, in the driver: ``PEEK_ROWS`` rows, not the input), with ``source_file``
    and ``source_row``."""
    files, fs, fmt, root = listing
    with fs.open_input_file(files[0]) if fmt == "parquet" else fs.open_input_stream(files[0]) as f:
        first = next(tagged_blocks(f, files[0], fmt, root, PEEK_ROWS), None)
    return first if first is not None else pa.table({SOURCE_FILE: pa.array([], pa.string()),
                                                     SOURCE_ROW: pa.array([], pa.int64())})


def columns_of(first: pa.Table) -> list[str]:
    return [c for c in first.column_names if c != TYPE_ERRORS]


def json_rows(f, name: str) -> Iterator[tuple[dict, int]]:
    """(row, bytes of its text) of each row of a JSON file: JSON lines (one object per line, read a chunk at a
    time), or one JSON array of objects (read whole). A line or element that is not a JSON object becomes a row
    holding only the reason, so that it is reported, not lost."""
    head = f.read(_CHUNK)
    if head.lstrip().startswith(b"["):
        text = (head + f.read()).decode("utf-8")
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            yield {TYPE_ERRORS: f"{name} is not a valid JSON array: {e}"}, 0
            return
        share = len(text) // max(len(items), 1)
        for k, item in enumerate(items):
            yield _object(item, f"element {k} of {name}"), share
        return
    for n, line in enumerate(_lines(head, f), 1):
        if line.strip():
            try:
                yield _object(json.loads(line), f"line {n} of {name}"), len(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                yield {TYPE_ERRORS: f"line {n} of {name} is not JSON: {e}"}, len(line)


def _lines(head: bytes, f) -> Iterator[bytes]:
    rest = head
    while True:
        *lines, rest = rest.split(b"\n")
        yield from lines
        chunk = f.read(_CHUNK)
        if not chunk:
            break
        rest += chunk
    if rest:
        yield rest


def _object(value, where: str) -> dict:
    if isinstance(value, dict):
        return value
    return {TYPE_ERRORS: f"{where} is a JSON {type(value).__name__}, not an object"}


def rows_to_table(rows: list[dict], schema: pa.Schema | None = None) -> pa.Table:
    """JSON rows -> a table, typed by ``schema`` where it has the column, else by the values: as JSON text for a
    column ``schema`` lacks, by the most common type without one. A value that does not fit becomes null, and its
    row carries the reason in a hidden column, so that one bad row cannot fail the whole read."""
    columns = list(dict.fromkeys(k for r in rows for k in r if k != TYPE_ERRORS))
    if schema is not None:  # every block has every column of the schema
        columns += [c for c in schema.names if c not in columns and c not in (SOURCE_FILE, SOURCE_ROW)]
    problems = [r.get(TYPE_ERRORS, "") for r in rows]
    arrays = {}
    for col in columns:
        values = [r.get(col) for r in rows]
        if schema is None:
            arrays[col] = _by_values(col, values, problems)
        elif col in schema.names and not (_as_text(schema.field(col))):
            arrays[col] = _typed(col, values, schema.field(col).type, problems)
        else:
            arrays[col] = pa.array([v if v is None or isinstance(v, str) else json.dumps(v) for v in values],
                                   pa.string())
    arrays[TYPE_ERRORS] = pa.array(problems, pa.string())  # always there: every block has the same hidden column
    return pa.table(arrays)


def _as_text_type(type_: pa.DataType, fmt: str) -> bool:
    """Columns of JSON objects or lists are kept as JSON text: their shape may change from row to row."""
    return pa.types.is_null(type_) or (fmt == "json" and pa.types.is_nested(type_))


def _as_text(field: pa.Field) -> bool:
    """A column of text the job does not read takes any value, as JSON text."""
    return pa.types.is_string(field.type) and not (field.metadata or {}).get(b"read")


def _by_values(col: str, values: list, problems: list[str]) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        types = [type(v).__name__ for v in values if v is not None]
        common = max(set(types), key=types.count)
        for i, v in enumerate(values):
            if v is not None and type(v).__name__ != common:
                problems[i] = problems[i] or f"column {col!r}: expected {common}, got {type(v).__name__}"
                values[i] = None
        return pa.array(values)


JSON_TEXT_COLUMNS = ("json_schema", "logit_bias", "tools", "tool_choice")  # string columns a job reads that JSON
# lines may give as an object or a list


def _typed(col: str, values: list, type_: pa.DataType, problems: list[str]) -> pa.Array:
    if pa.types.is_list(type_) and pa.types.is_string(type_.value_type):  # "x" means ["x"] (stop strings)
        values = [[v] if isinstance(v, str) else v for v in values]
    if col in JSON_TEXT_COLUMNS:
        values = [json.dumps(v) if isinstance(v, dict | list | bool) else v for v in values]
    if pa.types.is_list(type_) and pa.types.is_struct(type_.value_type):
        values = [_texts_in(v, type_.value_type) for v in values]
    fits = _KINDS.get(str(type_), lambda v: True)  # arrow would take 5 as "5" or True as 1: check the kind first
    try:
        if all(v is None or fits(v) for v in values):
            return pa.array(values, type_)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        pass
    fitted = []
    for i, v in enumerate(values):
        try:
            if v is not None and not fits(v):
                raise TypeError
            pa.array([v], type_)
            fitted.append(v)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError):
            problems[i] = problems[i] or (f"column {col!r}: expected {type_}, got "
                                          f"{type(v).__name__}")
            fitted.append(None)
    return pa.array(fitted, type_)


def _texts_in(value, struct: pa.StructType):
    """A list of objects typed as structs (chat messages): a text field given an object or a list (an assistant's
    tool_calls) holds its JSON text."""
    if not isinstance(value, list):
        return value
    text = {f.name for f in struct if pa.types.is_string(f.type)}
    return [{k: json.dumps(x) if k in text and isinstance(x, dict | list) else x for k, x in m.items()}
            if isinstance(m, dict) else m for m in value]


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


_KINDS = {"string": lambda v: isinstance(v, str), "double": _number,
          "int64": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "bool": lambda v: isinstance(v, bool)}
