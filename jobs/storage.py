"""Where jobs read and write: a local path or any URI pyarrow knows (s3://, gs://, hdfs://, file://), held as one
(filesystem, path) pair so that listing, reading, writing and deleting work the same on all of them."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from compress.files import new_folder


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """``s3://bucket/out/`` -> (S3FileSystem, "bucket/out"); a plain path -> (LocalFileSystem, absolute path)."""
    uri = str(uri)
    if "://" in uri:
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path.rstrip("/") or path
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def files(fs: pafs.FileSystem, root: str, suffix: str = "") -> list[str]:
    """Files directly under ``root`` whose names end with ``suffix``, sorted; none when ``root`` does not exist."""
    try:
        found = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except FileNotFoundError:  # made or removed while it was listed (a job starting to write it)
        return []
    return sorted(f.path for f in found if f.type == pafs.FileType.File and f.path.endswith(suffix))


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write a whole file at once: to a temporary name, then moved into place (where the filesystem can move), so
    that a reader never sees half of it."""
    fs.create_dir(os.path.dirname(path), recursive=True)
    temp = f"{path}.tmp-{os.getpid()}"
    with fs.open_output_stream(temp) as out:
        out.write(data)
    fs.move(temp, path)


def write_parquet(fs: pafs.FileSystem, path: str, table: pa.Table) -> None:
    """``write_bytes`` of a table as one parquet file."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes(fs, path, sink.getvalue().to_pybytes())


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as stream:
        return stream.read()


def upload(local_dir: str | os.PathLike, uri: str) -> None:
    """Copy a local folder to ``uri`` (a folder or any pyarrow URI), replacing what was there."""
    fs, path = resolve(uri)
    if exists(fs, path):
        fs.delete_dir(path)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(os.path.abspath(local_dir), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


def download(uri: str, local_dir: str | os.PathLike) -> None:
    """Copy the folder at ``uri`` into a local folder."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{uri!r} is not a folder")
    os.makedirs(local_dir, exist_ok=True)
    pafs.copy_files(path, os.path.abspath(local_dir), source_filesystem=fs,
                    destination_filesystem=pafs.LocalFileSystem())


@contextlib.contextmanager
def local_folder(uri: str) -> Iterator[str]:
    """A folder on this machine holding what ``uri`` holds: the folder itself when it is a local path, else a
    temporary copy, removed on exit."""
    if "://" not in str(uri):
        yield str(uri)
        return
    with tempfile.TemporaryDirectory(prefix="raypress-") as tmp:
        download(uri, tmp)
        yield tmp


SOURCE = ".raypress-source.json"  # in a cached model folder: the listing of the URI it was copied from


def local_model(model: str) -> str:
    """A model named by URI (``s3://bucket/sweep/int8-dynamic``, ``file://...``) as a folder on this node: copied
    once into ``$RAYPRESS_CACHE/models`` (default ~/.cache/raypress), and again only when the files at the URI
    changed (their names, sizes and times); every process of the node shares the copy. Any other name (built-in,
    folder, hub id) is returned as it is."""
    model = str(model)
    if "://" not in model:
        return model
    fs, path = resolve(model)
    listing = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    if not any(f.type == pafs.FileType.File for f in listing):
        raise FileNotFoundError(f"model {model!r}: no files there")
    source = json.dumps(sorted((f.path[len(path):], f.size, str(f.mtime)) for f in listing
                               if f.type == pafs.FileType.File))
    root = Path(os.environ.get("RAYPRESS_CACHE", "~/.cache/raypress")).expanduser() / "models"
    dest = root / f"{hashlib.sha256(model.encode()).hexdigest()[:12]}-{path.rsplit('/', 1)[-1]}"
    if (dest / SOURCE).exists() and (dest / SOURCE).read_text() == source:
        return str(dest)
    with new_folder(dest, replace=dest.exists()) as tmp:  # none yet: the first writer wins; a stale one: replaced
        download(model, tmp)
        (tmp / SOURCE).write_text(source)
    return str(dest)
