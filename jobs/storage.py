"""Where jobs read and write: a local path or any URI pyarrow knows (s3://, gs://, hdfs://, file://), held as one
(filesystem, path) pair so that listing, reading, writing and deleting work the same on all of them."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """``s3://bucket/out/`` -> (S3FileSystem, "bucket/out"); a plain path -> (LocalFileSystem, absolute path)."""
    uri = str(uri)
    if "://" in uri:
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path.rstrip("/") or path
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def files(fs: pafs.FileSystem, root: str, suffix: str = "") -> list[str]:
    """Files directly under ``root`` whose names end with ``suffix``, sorted; none when ``root`` does not exist."""
    found = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
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
