"""Reading a batch job's input: parquet, jsonl or csv; a file, a folder or a glob; local or any filesystem pyarrow
knows (s3://, gs://, ...). JSON rows are typed leniently, so that one malformed row cannot fail the whole read."""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from jobs import storage

FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
TYPE_ERRORS = "_input_error"  # set by the reader for rows it could not type; dropped from the output



def list_input_files(path: str) -> tuple[list[str], pafs.FileSystem, str]:
    """A file, a folder (every supported file below it) or a glob -> (files, filesystem, format)."""
    pattern = None
    if any(c in path for c in "*?["):
        cut = min(path.index(c) for c in "*?[" if c in path)
        path, pattern = path[: path.rfind("/", 0, cut) + 1] or ".", path
    fs, root = storage.resolve(path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {path!r} does not exist")
    if info.type == pafs.FileType.File:
        files = [root]
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
    return files, fs, formats.pop()


def read_input(path: str) -> pa.Table:
    files, fs, fmt = list_input_files(path)
    if fmt == "json":
        rows = []
        for f in files:
            with fs.open_input_stream(f) as stream:
                rows += json_rows(stream.read().decode("utf-8"), f)
        return rows_to_table(rows)
    return pads.dataset(files, filesystem=fs, format=fmt).to_table()


def json_rows(text: str, name: str) -> list[dict]:
    """The rows of a JSON file: JSON lines (one object per line), or one JSON array of objects. A line or element
    that is not a JSON object becomes a row holding only the reason, so that it is reported, not lost."""
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            return [{TYPE_ERRORS: f"{name} is not a valid JSON array: {e}"}]
        return [_object(item, f"element {k} of {name}") for k, item in enumerate(items)]
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(_object(json.loads(line), f"line {n} of {name}"))
            except json.JSONDecodeError as e:
                rows.append({TYPE_ERRORS: f"line {n} of {name} is not JSON: {e}"})
    return rows


def _object(value, where: str) -> dict:
    if isinstance(value, dict):
        return value
    return {TYPE_ERRORS: f"{where} is a JSON {type(value).__name__}, not an object"}


def rows_to_table(rows: list[dict]) -> pa.Table:
    """JSON rows -> a table. A value whose type differs from the rest of its column becomes null, and the row
    carries the reason in a hidden column, so that one bad row cannot fail the whole read."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    problems = [r.get(TYPE_ERRORS, "") for r in rows]
    arrays = {}
    for col in (c for c in columns if c != TYPE_ERRORS):
        values = [r.get(col) for r in rows]
        try:
            arrays[col] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            types = [type(v).__name__ for v in values if v is not None]
            common = max(set(types), key=types.count)
            for i, v in enumerate(values):
                if v is not None and type(v).__name__ != common:
                    problems[i] = problems[i] or f"column {col!r}: expected {common}, got {type(v).__name__}"
                    values[i] = None
            arrays[col] = pa.array(values)
    if any(problems):
        arrays[TYPE_ERRORS] = pa.array(problems, pa.string())
    return pa.table(arrays)
