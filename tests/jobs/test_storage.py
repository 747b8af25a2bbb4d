"""Models named by URI (jobs.storage.local_model): copied to a node once, again when they change; a batch job given
its model by URI answers from the node's copy."""

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs import batch_infer, storage


def test_a_model_uri_is_copied_once_and_again_only_when_its_files_change(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYPRESS_CACHE", str(tmp_path / "cache"))
    remote = tmp_path / "bucket" / "int8"
    remote.mkdir(parents=True)
    (remote / "config.json").write_text('{"a": 1}')
    (remote / "sub").mkdir()
    (remote / "sub" / "w.bin").write_bytes(b"x" * 10)
    first = Path(storage.local_model(f"file://{remote}"))
    assert first.parent == tmp_path / "cache" / "models" and first.name.endswith("-int8")
    assert (first / "sub" / "w.bin").read_bytes() == b"x" * 10 and json.loads((first / "config.json").read_text())
    (first / "config.json").write_text("touched here")  # a second call does not copy again
    assert storage.local_model(f"file://{remote}") == str(first)
    assert (first / "config.json").read_text() == "touched here"
    (remote / "sub" / "w.bin").write_bytes(b"y" * 11)  # the files at the URI changed: copied again
    assert storage.local_model(f"file://{remote}") == str(first)
    assert (first / "sub" / "w.bin").read_bytes() == b"y" * 11 and (first / "config.json").read_text() == '{"a": 1}'
    assert storage.local_model("smollm2-135m") == "smollm2-135m"  # names that are not URIs pass as they are
    with pytest.raises(FileNotFoundError, match="no files there"):
        storage.local_model(f"file://{tmp_path}/bucket/missing")


@pytest.mark.timeout(300)
def test_a_batch_job_given_its_model_by_uri_answers_every_row_from_a_copy(ray_local, tmp_path, tiny_causal_dir):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"Tell me about {k}."}) + "\n" for k in range(4)))
    uri = f"file://{tiny_causal_dir}"
    try:
        assert batch_infer.main(model=uri, input=str(src), output=str(tmp_path / "out"), max_tokens=4,
                                cpus_per_actor=0.5) == 0
        rows = pq.read_table(tmp_path / "out").to_pylist()
        assert len(rows) == 4 and all(r["error"] is None and r["num_generated_tokens"] > 0 for r in rows)
        copy = Path(storage.local_model(uri))
        assert copy != tiny_causal_dir and (copy / storage.SOURCE).exists()  # the node's copy the actors loaded
    finally:
        shutil.rmtree(storage.local_model(uri), ignore_errors=True)  # the copy every process of this node shared
