#!/usr/bin/env bash
# A third environment, .venv-recbole, where RecBole 1.2.1 really runs (benchmarks/bench_baselines.py
# trains its SASRec there as the textbook baseline). RecBole pins old libraries (ray<=2.6.3, and its
# code uses APIs numpy 2 and pandas 3 changed), so it cannot share .venv, where recbole is only
# installed --no-deps for its MovieLens-100K files. Here: torch 2.13.0 (CPU) first and pinned, then
# recbole --no-deps and only the packages its trainer, data and evaluator modules import at run time
# (not ray / thop / plotly / tabulate / psutil: only recbole.quick_start and hyper-tuning use those,
# and the benchmark's runner does not import them). Idempotent: a second run only checks.
#   bash scripts/setup-recbole.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
V=.venv-recbole
check() {
    "$V/bin/python" - <<'PY'
import warnings
warnings.filterwarnings("ignore")
import numpy, pandas, torch
import recbole
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.model.sequential_recommender import SASRec
from recbole.trainer import Trainer
from recbole.utils import init_seed
assert recbole.__version__ == "1.2.1" and torch.__version__.startswith("2.13.0"), (recbole.__version__, torch.__version__)
print(f"recbole set-up ok: recbole {recbole.__version__}, torch {torch.__version__}, "
      f"numpy {numpy.__version__}, pandas {pandas.__version__}")
PY
}
# Already set up: only check (a second run takes seconds).
if [ -x "$V/bin/python" ] && check 2>/dev/null; then exit 0; fi
[ -x "$V/bin/python" ] || "$PY" -m venv "$V"
"$V/bin/python" -m pip install -q --upgrade pip
# torch first and pinned: an open torch requirement would pull a multi-GB CUDA build.
"$V/bin/python" -m pip install -q "torch==2.13.0"
"$V/bin/python" -m pip install -q --no-deps "recbole==1.2.1"
# numpy<2 and pandas<3: RecBole 1.2.1 (2023) was built against numpy 1.x and pandas 1/2 (pandas 3
# changes the default string dtype its atomic-file reader relies on); both bounds are caution, not
# a tested necessity. SASRec's path works with these (benchmarks/bench_baselines.py).
"$V/bin/python" -m pip install -q "numpy<2" "pandas<3" scipy scikit-learn pyyaml tqdm \
    "colorlog==4.7.2" "colorama==0.4.4" texttable tensorboard
check
