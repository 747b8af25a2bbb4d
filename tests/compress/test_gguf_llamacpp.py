"""llama.cpp itself runs raypress's GGUF exports of SmolLM2 (int8 -> Q8_0, int4-g32 -> Q4_1): its tokenizer gives the
Hugging Face ids, and its greedy choice agrees with raypress's variant at >= 90% of 8 prompts x 64 tokens.

llama-cpp-python builds llama.cpp from source (a 76 MB sdist, minutes on 2 cores), so it is the bench extra, not a
dev dependency: `make test-peers` installs it and runs this file; `make test` (CI) skips it.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("llama_cpp", reason="llama-cpp-python is the bench extra: `make test-peers` installs it")


@pytest.mark.timeout(900)
def test_llama_cpp_runs_the_exports_with_the_same_tokens_and_greedy_choices(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, "bench/gguf_export.py", "--variants", "int8", "int4-g32", "--json",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)
    rows = {r["spec"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"int8", "int4-g32"}
    for spec, row in rows.items():
        assert row["tokens_equal"], spec
        assert row["tokens"] >= 400 and row["top1_agreement"] >= 0.9, row  # teacher-forced, per generated token
