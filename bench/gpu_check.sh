#!/usr/bin/env bash
# The GPU check, one script for a machine with an NVIDIA GPU (about 3-8 minutes on one modern GPU):
#   1. installs llama-cpp-python's CUDA build the way the notebook does (python -m helpers.install: the
#      prebuilt CUDA wheel first, else a CUDA build from source for this GPU), timed; on a fresh checkout
#      through `make setup` (which runs it, then installs the test requirements), in an existing one by
#      replacing a CPU-only build;
#   2. runs the tests marked `gpu` (they must pass, not be skipped);
#   3. writes a Llama-2-7B-shaped GGUF (bench/make_llama2_gguf.py: real architecture and vocabulary, random
#      weights; Q4_0 is written directly in seconds) and runs bench/scale.py on it, every layer offloaded
#      ("auto" puts all 33 on any GPU with 8 GB free), then bench/speculative.py (issue 20): the SmolLM2 tasks
#      off / prompt-lookup / llama-cpp-python's prompt lookup, and the cost of verifying k+1 tokens against
#      one inside the engine's loop on that file, with the speedup the measured acceptance implies there;
#   4. prints a short table (bench/gpu_table.py): install path and time, layers offloaded, prompt and
#      generation tokens/s, time to first token, generation against the GPU's memory-bandwidth ceiling.
#
# Usage: bash bench/gpu_check.sh [--dry-run]      (--dry-run prints the commands and runs none of them)
# Settings: GPU_CHECK_PYTHON (an environment set up already; default .venv/bin/python, made by `make setup`
# when missing), GPU_CHECK_DIR (default /tmp/gpu-check), GPU_CHECK_QUANT
# (default Q4_0; Q4_K_M as in `make bench-7b` adds llama.cpp's quantizer, about a minute on many cores).
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; fi
python=${GPU_CHECK_PYTHON:-.venv/bin/python}
out=${GPU_CHECK_DIR:-/tmp/gpu-check}
quant=${GPU_CHECK_QUANT:-Q4_0}
model="$out/llama2-7b-shaped.$quant.gguf"
vocab=tests/data/ggml-vocab-llama-spm.gguf

run() {  # print a step, then run it (not with --dry-run); its output also goes to $out/<log>
    local log=$1
    shift
    echo "+ $*"
    if [[ $dry_run == 0 ]]; then "$@" 2>&1 | tee "$out/$log"; fi
}

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "No NVIDIA GPU here (nvidia-smi is missing or finds no device): this check needs one." >&2
    exit 2
fi
if [[ -n ${GPU_CHECK_PYTHON:-} && ! -x $python ]]; then
    echo "GPU_CHECK_PYTHON=$python is not a Python here: unset it to let make setup create .venv." >&2
    exit 2
fi
if ! command -v python3 >/dev/null; then
    echo "python3 is not installed: install Python 3 (with its venv module) first." >&2
    exit 2
fi
# helpers.machine.gpu needs only the standard library: any Python 3 can name the GPU before the venv exists.
gpu=$(python3 -c "from helpers.machine.gpu import detect_gpu; print(detect_gpu(check_offload=False).name)")
echo "GPU: $gpu"
mkdir -p "$out"
started=$SECONDS

# 1. The CUDA build, as the notebook's install cell gets it: a fresh checkout gets it (and the test
# requirements) from `make setup`; an existing venv with a CPU-only build has it replaced by helpers.install.
install_logs=("$out/install.log")
if [[ ! -x $python ]]; then
    # The Makefile's PYTHON is the interpreter that makes the venv: never a value meant for something else.
    if ! run setup.log env -u PYTHON make setup; then
        echo "make setup failed: see $out/setup.log." >&2
        exit 1
    fi
    install_logs=("$out/setup.log" "$out/install.log")
fi
run install.log "$python" -m helpers.install
if [[ $dry_run == 0 ]] && ! "$python" -c "import llama_cpp, sys; sys.exit(not llama_cpp.llama_supports_gpu_offload())"; then
    echo "The installed llama-cpp-python cannot offload to the GPU: see $out/install.log." >&2
    exit 1
fi

# 2. The gpu tests: skipped is a failure here.
run gpu-tests.log "$python" -m pytest -m gpu -rs -q tests
if [[ $dry_run == 0 ]] && ! grep -q " passed" "$out/gpu-tests.log"; then
    echo "The gpu tests did not pass (skipped or failed): see $out/gpu-tests.log." >&2
    exit 1
fi

# 3. The 7B-scale benchmark, every layer on the GPU.
if [[ ! -f $vocab ]]; then run vocab.log "$python" tests/support/fetch_vocab.py "$(dirname "$vocab")"; fi
if [[ ! -f $model ]]; then run model.log "$python" bench/make_llama2_gguf.py "$model" --quant "$quant"; fi
run scale.txt "$python" bench/scale.py --model "$model" --tokens 128
# Speculative decoding (issue 20): the rows of docs/performance.md's "Speculative decoding" section.
run speculative.txt "$python" bench/speculative.py --big "$model" --rounds 3

# 4. The table.
run table.txt "$python" bench/gpu_table.py --install "${install_logs[@]}" --scale "$out/scale.txt" --gpu "$gpu" --model "$model"
echo "GPU check done in $((SECONDS - started)) s; logs in $out."
