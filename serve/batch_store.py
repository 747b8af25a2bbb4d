"""Where the Batch API keeps its state: file bytes under a storage URI, file and batch records in SQLite.

Both outlive the serving replica: a restarted replica opens the same database and storage and reports the same
files and batches. Storage is a local folder by default and any pyarrow filesystem on a cluster (``s3://...``), so
that the batch job, wherever Ray places it, reads its input and writes its output there. The database is one
SQLite file in WAL mode: replicas on one node share it safely (SQLite locks it). SQLite documents WAL as unsafe
on network filesystems, so a database on NFS, SMB, CephFS, Lustre or a network FUSE mount is refused: run the Batch
API's replicas on one node (the batch jobs themselves run anywhere on the cluster, reading and writing storage).

Every change of a batch's state is a compare-and-set (``update_batch(..., expect=...)``): of several replicas or
threads refreshing one batch, one makes each move, and only the one that claimed a move does its side effects.

Layout under the storage root::

    files/<file id>                       uploaded files, and the output and error files of finished batches
    batches/<batch id>/rows.parquet       the batch job's input: one row per prompt or input text
    batches/<batch id>/rejected.jsonl     lines refused before the model (with the error a request would get)
    batches/<batch id>/results/*.parquet  jobs.batch_infer's output, written as rows finish
    batches/<batch id>/summary.json       the finished batch: counts and its output and error files
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from contextlib import closing

from jobs import storage
from serve.responses import new_id

TERMINAL = ("completed", "failed", "cancelled", "expired")
_ACTIVE = f"status NOT IN ({', '.join(repr(s) for s in TERMINAL)})"
# what SQLite's WAL must not live on (https://www.sqlite.org/wal.html: "WAL does not work over a network filesystem")
NETWORK_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "lustre", "gpfs", "beegfs",
                       "afs", "9p", "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.rclone", "fuse.juicefs",
                       "fuse.goofys", "fuse.glusterfs", "fuse.ceph-fuse", "fuse.cephfs", "fuse.mountpoint-s3"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, filename TEXT NOT NULL, purpose TEXT NOT NULL, bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, created_at INTEGER NOT NULL, status TEXT NOT NULL, body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS batches_by_time ON batches (created_at, id);
"""


class BatchStore:
    def __init__(self, storage_uri: str, db_path: str | None = None):
        self.uri = storage_uri
        self.fs, self.root = storage.resolve(storage_uri)
        self.fs.create_dir(f"{self.root}/files", recursive=True)
        self.db_path = database_path(storage_uri, db_path)
        os.makedirs(os.path.dirname(self.db_path), exist_ok=True)
        kind = filesystem_type(os.path.dirname(self.db_path))
        if kind in NETWORK_FILESYSTEMS:
            raise ValueError(f"the Batch API's database {self.db_path} is on a network filesystem ({kind}), where "
                             "SQLite's write-ahead log is unsafe: give batch_db a path on a local disk and run the "
                             "Batch API's replicas on that one node")
        with closing(self._connect()) as db, db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        return db

    # -- paths ----------------------------------------------------------------------------------------------------

    def file_path(self, file_id: str) -> str:
        return f"{self.root}/files/{file_id}"

    def batch_dir(self, batch_id: str) -> str:
        return f"{self.root}/batches/{batch_id}"

    # -- files ----------------------------------------------------------------------------------------------------

    def add_file(self, chunks, filename: str, purpose: str, max_bytes: int, file_id: str | None = None) -> dict:
        """Store an upload given as an iterable of byte chunks; more than ``max_bytes`` raises ValueError and
        leaves nothing behind."""
        file_id = file_id or new_id("file-")
        path, size = self.file_path(file_id), 0
        try:
            with self.fs.open_output_stream(path) as out:
                for chunk in chunks:
                    size += len(chunk)
                    if size > max_bytes:
                        raise ValueError(f"file is larger than the limit of {max_bytes} bytes")
                    out.write(chunk)
        except BaseException:
            self.fs.delete_file(path)
            raise
        return self.register_file(file_id, filename, purpose, size)

    def register_file(self, file_id: str, filename: str, purpose: str, size: int) -> dict:
        record = {"id": file_id, "filename": filename, "purpose": purpose, "bytes": size,
                  "created_at": int(time.time())}
        with closing(self._connect()) as db:
            db.execute("INSERT OR REPLACE INTO files VALUES (:id, :filename, :purpose, :bytes, :created_at)", record)
        return record

    def get_file(self, file_id: str) -> dict | None:
        with closing(self._connect()) as db:
            row = db.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        return dict(row) if row else None

    def read_file(self, file_id: str) -> bytes:
        return storage.read_bytes(self.fs, self.file_path(file_id))

    def delete_file(self, file_id: str) -> bool:
        """Delete a file and its bytes; False when there is none. The input of a batch that has not ended is kept
        (FileInUse names the batch): one statement checks and deletes, so no batch can be created on it between."""
        reader = f"SELECT id FROM batches WHERE {_ACTIVE} AND json_extract(body, '$.input_file_id') = ?"
        with closing(self._connect()) as db:
            deleted = db.execute(f"DELETE FROM files WHERE id = ? AND NOT EXISTS ({reader})",
                                 (file_id, file_id)).rowcount
            if not deleted:
                batch = db.execute(reader + " LIMIT 1", (file_id,)).fetchone()
                if batch is not None:
                    raise FileInUse(file_id, batch["id"])
        if deleted and storage.exists(self.fs, self.file_path(file_id)):
            self.fs.delete_file(self.file_path(file_id))
        return bool(deleted)

    # -- batches --------------------------------------------------------------------------------------------------

    def add_batch(self, batch: dict) -> bool:
        """Insert a new batch while its input file exists (False if it was deleted meanwhile): one statement, so
        that a delete of that file and this insert never both succeed."""
        with closing(self._connect()) as db:
            return db.execute("INSERT INTO batches SELECT ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM files WHERE id = ?)",
                              (batch["id"], batch["created_at"], batch["status"], json.dumps(batch),
                               batch["input_file_id"])).rowcount == 1

    def get_batch(self, batch_id: str) -> dict | None:
        with closing(self._connect()) as db:
            row = db.execute("SELECT body FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return json.loads(row["body"]) if row else None

    def update_batch(self, batch: dict, expect: dict | None = None) -> bool:
        """Write ``batch`` back, only where every field of ``expect`` (a dotted path into the stored batch: "status",
        "ending.by") still holds the given value: a compare-and-set. Returns whether it was written."""
        query, args = "UPDATE batches SET status = ?, body = ? WHERE id = ?", [batch["status"], json.dumps(batch),
                                                                               batch["id"]]
        for path, value in (expect or {}).items():
            query, args = query + " AND json_extract(body, ?) IS ?", args + [f"$.{path}", value]
        with closing(self._connect()) as db:
            return db.execute(query, args).rowcount == 1

    def active_batches(self) -> list[dict]:
        with closing(self._connect()) as db:
            return [json.loads(r["body"]) for r in db.execute(f"SELECT body FROM batches WHERE {_ACTIVE}")]

    def list_batches(self, limit: int, after: str | None = None) -> tuple[list[dict], bool]:
        """Newest first, as OpenAI lists them; ``after`` is the id of the last batch of the previous page."""
        with closing(self._connect()) as db:
            if after is None:
                rows = db.execute("SELECT body FROM batches ORDER BY created_at DESC, id DESC LIMIT ?", (limit + 1,))
            else:
                cursor = db.execute("SELECT created_at, id FROM batches WHERE id = ?", (after,)).fetchone()
                if cursor is None:
                    raise KeyError(after)
                rows = db.execute("SELECT body FROM batches WHERE (created_at, id) < (?, ?) "
                                  "ORDER BY created_at DESC, id DESC LIMIT ?", (cursor[0], cursor[1], limit + 1))
            found = [json.loads(r["body"]) for r in rows.fetchall()]
        return found[:limit], len(found) > limit


def database_path(storage_uri: str, db_path: str | None = None) -> str:
    """Where the database is: ``db_path``, or batches.sqlite in a local storage folder."""
    if db_path is None:
        if "://" in storage_uri:
            raise ValueError(f"batch storage {storage_uri!r} is not a local folder: give batch_db, the path of the "
                             "SQLite database, on a local disk")
        db_path = os.path.join(storage.resolve(storage_uri)[1], "batches.sqlite")
    return os.path.abspath(os.path.expanduser(db_path))


class FileInUse(Exception):
    def __init__(self, file_id: str, batch_id: str):
        super().__init__(f"file {file_id} is the input of batch {batch_id}, which has not ended: cancel it, or wait "
                         "for it to end, before deleting its input")
        self.batch_id = batch_id


def filesystem_type(path: str, mounts: str | None = None) -> str:
    """The type of the filesystem that holds ``path`` ("ext4", "nfs4", ...), from /proc/mounts (or the text given:
    lines of "device mount-point type options ..."); "" where that is not known (not Linux)."""
    if mounts is None:
        try:
            with open("/proc/mounts") as f:
                mounts = f.read()
        except OSError:
            return ""
    path, best, kind = os.path.realpath(path), "", ""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")  # /proc/mounts writes a space in a path as \040
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind
