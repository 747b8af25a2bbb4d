"""OpenAI's Files and Batches APIs on the serving app: each batch runs as a Ray job (serve/batch_job.py) on the
cluster, and its state lives in a BatchStore (SQLite + storage URI), so a restarted replica picks it up.

A batch moves validating -> in_progress -> finalizing -> completed, or to failed, cancelled (cancelling first) or
expired; ``request_counts`` follow the rows as the job writes them. The job finalizes a batch it runs to the end;
this side finalizes one that was cancelled, expired or failed, from the rows that had finished, so that every
request line still gets an output or error line.

Every move is a compare-and-set in the store, made before its side effects: of several replicas (or threads)
refreshing one batch, only the one whose move landed stops its job or writes its files. Finalizing on this side
first claims the batch (status ``ending``, shown as cancelling or finalizing) with a token of its own; a claim
older than ``CLAIM_TIMEOUT_S`` (its replica died mid-way) may be taken over. The output and error files of a batch
have ids made from the batch's id, so that finalizing twice (the job, then this side after the job was stopped)
rewrites one set of files instead of leaving a second. Replicas also refresh unfinished batches every
``POLL_S`` seconds, so a batch expires, and its files are registered, without a client polling it.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
import time

from ray.job_submission import JobStatus, JobSubmissionClient

from jobs import storage
from serve import batch_job
from serve import responses as rs
from serve.batch_store import TERMINAL, BatchStore, FileInUse
from serve.protocol import APIError
from serve.responses import new_id

log = logging.getLogger("ray.serve")
WINDOWS = {"24h": 24 * 3600}
_TIMES = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
          "cancelled_at")
_FINAL = {"cancelling": "cancelled", "expiring": "expired"}
SUBMIT_GRACE_S = 300  # a validating batch whose job the API does not know yet: its replica may still be submitting
CLAIM_TIMEOUT_S = 900  # a claim to finalize older than this is taken over (the replica that made it is gone)
POLL_S = 60


def file_object(record: dict) -> dict:
    fields = {k: record[k] for k in ("id", "bytes", "created_at", "filename", "purpose")}
    return rs.FileObject(object="file", status="processed", **fields).model_dump()


def public(batch: dict) -> dict:
    """The batch object OpenAI returns: the private states show as OpenAI's ("expiring" and an ``ending`` claim as
    "finalizing", a cancelled batch's claim as "cancelling"); private fields are dropped."""
    status = batch["status"]
    if status == "ending":
        status = "cancelling" if batch["ending"]["to"] == "cancelled" else "finalizing"
    elif status == "expiring":
        status = "finalizing"
    return rs.Batch.model_validate({**batch, "status": status}).model_dump()


class Batches:
    """What the routes call. Every method is blocking (SQLite, storage, the job API): routes run them in a thread."""

    def __init__(self, store: BatchStore, *, model: str, served_name: str, causal: bool, default_max_tokens: int,
                 max_model_len: int, max_requests: int = 50_000, max_file_bytes: int = 200 << 20,
                 num_actors: int = 1, cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0,
                 engine: str = "auto", batch_size: int = 16, jobs_address: str | None = None):
        self.store = store
        self.job_args = {"model": model, "served_name": served_name, "causal": causal,
                         "default_max_tokens": default_max_tokens, "max_model_len": max_model_len,
                         "max_requests": max_requests, "num_actors": num_actors, "cpus_per_actor": cpus_per_actor,
                         "num_gpus_per_actor": gpus_per_actor, "engine": engine, "batch_size": batch_size}
        self.max_requests, self.max_file_bytes = max_requests, max_file_bytes
        self.causal, self.jobs_address, self._client = causal, jobs_address, None

    @property
    def jobs(self) -> JobSubmissionClient:
        if self._client is None:
            import ray

            # the job API of the cluster this replica runs on, unless told another (a batch cluster of its own)
            self._client = JobSubmissionClient(self.jobs_address or ray.get_runtime_context().gcs_address)
        return self._client

    # -- files ----------------------------------------------------------------------------------------------------

    def add_file(self, chunks, filename: str, purpose: str) -> dict:
        if purpose != "batch":
            raise APIError(400, f"purpose {purpose!r}: this server takes files for batches (purpose 'batch')",
                           "purpose")
        try:
            return file_object(self.store.add_file(chunks, filename or "upload.jsonl", purpose, self.max_file_bytes))
        except ValueError as e:
            raise APIError(413, str(e), "file") from e

    def file(self, file_id: str) -> dict:
        record = self.store.get_file(file_id)
        if record is None:
            raise APIError(404, f"no file {file_id!r}", "file_id")
        return record

    def delete_file(self, file_id: str) -> dict:
        try:
            deleted = self.store.delete_file(file_id)
        except FileInUse as e:
            raise APIError(409, str(e), "file_id") from e
        if not deleted:
            raise APIError(404, f"no file {file_id!r}", "file_id")
        return {"id": file_id, "object": "file", "deleted": True}

    # -- batches --------------------------------------------------------------------------------------------------

    def create(self, input_file_id: str, endpoint: str, completion_window: str, metadata: dict | None) -> dict:
        if endpoint not in batch_job.ENDPOINTS:
            raise APIError(400, f"endpoint {endpoint!r}: expected one of {sorted(batch_job.ENDPOINTS)}", "endpoint")
        if (endpoint == "/v1/embeddings") == self.causal:
            kind = "a causal LM: batches of /v1/chat/completions or /v1/completions" if self.causal else \
                "an encoder: batches of /v1/embeddings"
            raise APIError(400, f"endpoint {endpoint!r} does not fit the served model, {kind}", "endpoint")
        if completion_window not in WINDOWS:
            raise APIError(400, f"completion_window {completion_window!r}: expected one of {sorted(WINDOWS)}",
                           "completion_window")
        if metadata is not None and (len(metadata) > 16 or not all(
                isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
                for k, v in metadata.items())):
            raise APIError(400, "metadata: at most 16 string keys (64 characters) with string values (512)",
                           "metadata")
        record = self.file(input_file_id)
        if record["purpose"] != "batch":
            raise APIError(400, f"file {input_file_id!r} has purpose {record['purpose']!r}, not 'batch'",
                           "input_file_id")
        requests = batch_job.parse_requests(self.store.read_file(input_file_id), endpoint, self.max_requests)
        now = int(time.time())
        batch = {"id": new_id("batch_"), "object": "batch", "endpoint": endpoint, "errors": None,
                 "input_file_id": input_file_id, "completion_window": completion_window, "status": "validating",
                 "output_file_id": None, "error_file_id": None, "created_at": now,
                 "expires_at": now + WINDOWS[completion_window], **dict.fromkeys(_TIMES),
                 "request_counts": {"total": len(requests), "completed": 0, "failed": 0}, "metadata": metadata}
        if not self.store.add_batch(batch):
            raise APIError(404, f"no file {input_file_id!r} (it was deleted)", "input_file_id")
        args = {"storage_uri": self.store.uri, "batch_id": batch["id"], "input_file_id": input_file_id,
                "endpoint": endpoint, **self.job_args}
        try:
            self.jobs.submit_job(entrypoint=_command(args), submission_id=batch["id"], runtime_env=_runtime_env(),
                                 metadata={"raypress_batch": batch["id"]})
        except Exception as e:  # the job API refused: the batch fails now, with the reason
            batch = self._end(batch, "failed", errors=[{"code": "job_submission_failed", "message": str(e)}],
                              expect={"status": "validating"})
        return public(batch)

    def retrieve(self, batch_id: str) -> dict:
        batch = self.store.get_batch(batch_id)
        if batch is None:
            raise APIError(404, f"no batch {batch_id!r}", "batch_id")
        return public(self._refresh(batch))

    def list(self, limit: int, after: str | None) -> dict:
        if not 1 <= limit <= 100:
            raise APIError(400, "limit must be between 1 and 100", "limit")
        try:
            found, more = self.store.list_batches(limit, after)
        except KeyError as e:
            raise APIError(404, f"no batch {after!r} to list after", "after") from e
        data = [public(self._refresh(b)) for b in found]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": more}

    def cancel(self, batch_id: str) -> dict:
        batch = self.store.get_batch(batch_id)
        if batch is None:
            raise APIError(404, f"no batch {batch_id!r}", "batch_id")
        batch = self._refresh(batch)
        if batch["status"] in TERMINAL or batch["status"] in (*_FINAL, "ending"):
            raise APIError(409, f"batch {batch_id} is {public(batch)['status']}; only a running batch can be "
                                "cancelled", "batch_id")
        old = batch["status"]
        batch.update(status="cancelling", cancelling_at=int(time.time()))
        if not self.store.update_batch(batch, expect={"status": old}):  # it moved meanwhile: report where it is
            return self.retrieve(batch_id)
        self._stop(batch_id)
        return public(batch)  # cancelling, as OpenAI answers; the job stops and the batch ends cancelled

    # -- following the job ----------------------------------------------------------------------------------------

    def poll(self) -> None:
        """Refresh every unfinished batch (a replica's background thread calls this every POLL_S seconds)."""
        for batch in self.store.active_batches():
            try:
                self._refresh(batch)
            except Exception as e:  # one batch's trouble (its input file unreadable) does not stop the others
                log.warning("batch %s: refresh failed: %s", batch["id"], e)

    def _refresh(self, batch: dict) -> dict:
        """Bring an unfinished batch up to date with its job; every move is a compare-and-set (see the module)."""
        old, now = batch["status"], int(time.time())
        if old in TERMINAL:
            return batch
        if old == "ending":  # claimed by a finalizer; taken over only when that claim is stale
            claim = batch["ending"]
            if now - claim["at"] < CLAIM_TIMEOUT_S:
                return batch
            return self._finalize(batch, claim["to"], claim["errors"], {"status": "ending", "ending.by": claim["by"]})
        fs, folder = self.store.fs, self.store.batch_dir(batch["id"])
        try:
            info = self.jobs.get_job_info(batch["id"])
        except Exception as e:
            if "status code 404" not in str(e):  # the job API did not answer: report what is known, try next time
                log.warning("batch %s: job API unavailable (%s)", batch["id"], e)
                return batch
            info = None  # the job is unknown: not submitted yet, or the cluster that ran it is gone
        if info is None and old == "validating" and now - batch["created_at"] < SUBMIT_GRACE_S:
            return batch  # the replica that created it is still submitting its job
        if old in ("validating", "in_progress", "finalizing") and now >= batch["expires_at"]:
            batch.update(status="expiring")
            if self.store.update_batch(batch, expect={"status": old}):
                self._stop(batch["id"])
            return self._refresh(self.store.get_batch(batch["id"]))
        status = info.status if info else JobStatus.FAILED
        if status == JobStatus.SUCCEEDED and storage.exists(fs, f"{folder}/summary.json"):
            summary = json.loads(storage.read_bytes(fs, f"{folder}/summary.json"))
            return self._end(batch, "completed", summary, expect={"status": old})
        if status.is_terminal():  # stopped (cancel, expiry) or failed: finalize from the rows that finished
            final = _FINAL.get(old, "failed")
            errors = None
            if final == "failed":
                message = info.message if info else "the batch's Ray job is gone (was the cluster restarted?)"
                errors = [{"code": "batch_job_failed", "message": message}]
            return self._finalize(batch, final, errors, {"status": old})
        if old == "validating" and status == JobStatus.RUNNING:
            batch.update(status="in_progress", in_progress_at=now)
        if batch["status"] == "in_progress" and storage.exists(fs, f"{folder}/finalizing"):
            batch.update(status="finalizing", finalizing_at=now)
        batch["request_counts"] = batch_job.progress(fs, folder, batch["request_counts"]["total"])
        self.store.update_batch(batch, expect={"status": old})
        return batch

    def _finalize(self, batch: dict, final: str, errors: list | None, expect: dict) -> dict:
        """Claim the batch (compare-and-set to ``ending``), then write its files from the rows that finished and
        end it; a replica that loses the claim reports the batch as the winner left it."""
        claim = {"to": final, "errors": errors, "at": int(time.time()), "by": new_id("claim-")}
        batch = {**batch, "status": "ending", "ending": claim}
        if not self.store.update_batch(batch, expect=expect):
            return self.store.get_batch(batch["id"])
        requests = batch_job.parse_requests(self.store.read_file(batch["input_file_id"]), batch["endpoint"],
                                            self.max_requests)
        summary = batch_job.finalize(self.store.fs, self.store.root, batch["id"], [c for c, _ in requests],
                                     batch["endpoint"], self.job_args["served_name"], unfinished=final)
        return self._end(batch, final, summary, errors=errors, expect={"status": "ending", "ending.by": claim["by"]})

    def _end(self, batch: dict, status: str, summary: dict | None = None, errors: list | None = None,
             expect: dict | None = None) -> dict:
        """Move to a final state. The files it registers have ids of the batch's own, so a replica that loses the
        compare-and-set has registered the same records the winner did, not orphans."""
        batch = {k: v for k, v in batch.items() if k != "ending"}
        batch.update(status=status, **{f"{status}_at": int(time.time())})
        if errors:
            batch["errors"] = {"object": "list", "data": [{**e, "line": None, "param": None} for e in errors]}
        if summary:
            batch["request_counts"] = summary["request_counts"]
            for key in ("output_file", "error_file"):
                if summary[key]:
                    f = summary[key]
                    self.store.register_file(f["id"], f["filename"], "batch_output", f["bytes"])
                    batch[f"{key}_id"] = f["id"]
        if not self.store.update_batch(batch, expect=expect):
            return self.store.get_batch(batch["id"])  # another replica made this move first
        return batch

    def _stop(self, batch_id: str) -> None:
        try:
            self.jobs.stop_job(batch_id)
        except Exception as e:  # already finished or gone: the next refresh sees its final status
            log.info("batch %s: stop_job: %s", batch_id, e)


def _command(args: dict) -> str:
    words = [sys.executable, "-m", "serve.batch_job"]
    for key, value in args.items():
        if isinstance(value, bool):
            words.append(f"--{'' if value else 'no-'}{key.replace('_', '-')}")
        else:
            words += [f"--{key.replace('_', '-')}", str(value)]
    return shlex.join(words)


def _runtime_env() -> dict:
    """The job runs with the serving replica's code and environment variables, however the replica got them."""
    import ray

    env = dict(ray.get_runtime_context().runtime_env or {})
    return {k: env[k] for k in ("working_dir", "py_modules", "env_vars", "pip", "uv", "conda") if env.get(k)}
