"""The Batch API's store on its own (no Ray, no server): the compare-and-set every move of a batch goes through, a
batch's input that cannot be deleted while it runs, and the database refused on a network filesystem."""

import concurrent.futures as cf

import pytest

from serve import batch_store
from serve.batch_store import BatchStore, FileInUse


def _batch(store: BatchStore, file_id: str, status: str = "validating", **fields) -> dict:
    batch = {"id": f"batch_{file_id}", "object": "batch", "input_file_id": file_id, "status": status,
             "created_at": 1, **fields}
    assert store.add_batch(batch)
    return batch


def test_an_unfinished_batchs_input_is_kept_and_a_deleted_file_takes_no_batch(tmp_path):
    store = BatchStore(str(tmp_path))
    for name in ("a", "b"):
        store.add_file([b"{}\n"], f"{name}.jsonl", "batch", 1 << 20, file_id=name)
    batch = _batch(store, "a", status="in_progress")
    with pytest.raises(FileInUse, match="batch_a"):
        store.delete_file("a")
    assert store.get_file("a") is not None and (tmp_path / "files" / "a").exists()
    batch["status"] = "cancelled"
    assert store.update_batch(batch, expect={"status": "in_progress"})
    assert store.delete_file("a") and not (tmp_path / "files" / "a").exists()

    assert store.delete_file("b") and not store.delete_file("b")
    assert not store.add_batch({"id": "batch_late", "input_file_id": "b", "status": "validating", "created_at": 2})
    assert store.get_batch("batch_late") is None


def test_of_concurrent_moves_from_one_state_exactly_one_lands(tmp_path):
    store = BatchStore(str(tmp_path))
    store.add_file([b"{}\n"], "a.jsonl", "batch", 1 << 20, file_id="a")
    batch = _batch(store, "a", status="cancelling")

    def claim(k: int) -> bool:
        return store.update_batch({**batch, "status": "ending", "ending": {"by": f"claim-{k}"}},
                                  expect={"status": "cancelling"})

    with cf.ThreadPoolExecutor(16) as pool:
        won = [k for k, ok in enumerate(pool.map(claim, range(16))) if ok]
    assert len(won) == 1
    stored = store.get_batch(batch["id"])
    assert stored["status"] == "ending" and stored["ending"]["by"] == f"claim-{won[0]}"
    # a claim is released only by its own token
    assert not store.update_batch({**stored, "status": "cancelled"}, expect={"status": "ending", "ending.by": "x"})
    assert store.update_batch({**stored, "status": "cancelled"},
                              expect={"status": "ending", "ending.by": f"claim-{won[0]}"})
    assert [b["id"] for b in store.active_batches()] == []


MOUNTS = """/dev/nvme0n1p1 / ext4 rw,relatime 0 0
server:/export /mnt/shared nfs4 rw,vers=4.2 0 0
//host/share /mnt/smb\\040drive cifs rw 0 0
tmpfs /mnt/shared/local tmpfs rw 0 0
"""


def test_the_database_is_refused_on_a_network_filesystem(tmp_path, monkeypatch):
    kind = batch_store.filesystem_type
    assert kind("/home/me/batches", MOUNTS) == "ext4"
    assert kind("/mnt/shared/batches", MOUNTS) == "nfs4" and kind("/mnt/shared", MOUNTS) == "nfs4"
    assert kind("/mnt/shared/local/db", MOUNTS) == "tmpfs"  # the deepest mount that holds the path
    assert kind("/mnt/smb drive/x", MOUNTS) == "cifs" and kind("/mnt/sharedx", MOUNTS) == "ext4"
    assert kind(str(tmp_path)) != ""  # this machine's own table is read
    # an NFS mount cannot be made here: the store is shown one through the table it reads
    monkeypatch.setattr(batch_store, "filesystem_type", lambda path: kind(path, f"host:/x {tmp_path} nfs4 rw 0 0"))
    with pytest.raises(ValueError, match=r"network filesystem \(nfs4\).*local disk"):
        BatchStore(str(tmp_path / "storage"))


def test_a_batch_jobs_command_carries_the_gpu_and_engine_settings_and_parses_back(tmp_path):
    import shlex

    from jobs.cli import build_parser
    from serve import batch_job
    from serve.batches import Batches, _command

    batches = Batches(BatchStore(str(tmp_path)), model="smollm2-135m", served_name="smol", causal=True,
                      default_max_tokens=8, max_model_len=256, gpus_per_actor=1.0, engine="vllm")
    words = shlex.split(_command({"storage_uri": str(tmp_path), "batch_id": "batch_x", "input_file_id": "file-x",
                                  "endpoint": "/v1/chat/completions", **batches.job_args}))
    args = build_parser(batch_job.main).parse_args(words[3:])  # after: python -m serve.batch_job
    assert args.num_gpus_per_actor == 1.0 and args.engine == "vllm" and args.causal is True
