"""Quality on the full Amazon Scientific data: the generative model, SASRec and popularity,
side by side in one run on the same split; then the independent scorer recomputes every
model's metrics from the predictions files, and the two must agree.

    .venv/bin/python benchmarks/bench_quality.py [--output runs/bench-scientific] [key=value ...]

Target (issue 2): the generative model's NDCG@10 at or above SASRec's. The script prints the
table, the scorer's figures next to ours, and whether the target is met; it never hides a miss.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from digr.eval.report import metrics_table
from digr.pipeline.run import PipelineConfig, run_pipeline
from digr.platform.config import load

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "amazon-scientific"
SCORER = REPO.parent / "shared" / "tools" / "score.py"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "scientific.yaml"))
    ap.add_argument("--output", default=str(REPO / "runs" / "bench-scientific"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load(PipelineConfig, args.config, [f"ingest.path={DATA}", *args.overrides])
    t0 = time.time()
    metrics = run_pipeline(cfg, args.output)
    wall = time.time() - t0

    print(f"\nwall time {wall / 60:.1f} min; independent check with {SCORER.name}:")
    agree = True
    for model, ours in metrics.items():
        preds = Path(args.output) / "evaluate" / f"predictions_{model}.jsonl"
        out = subprocess.run([sys.executable, str(SCORER), str(DATA), str(preds)], capture_output=True, text=True,
                             check=True)
        theirs = json.loads(out.stdout)
        diffs = {k: abs(theirs[k] - ours[k]) for k in ("hr@5", "hr@10", "ndcg@5", "ndcg@10")}
        ok = max(diffs.values()) < 1e-4 and theirs["missing"] == 0
        agree &= ok
        print(f"  {model:<11} score.py ndcg@10 {theirs['ndcg@10']:.5f} hr@10 {theirs['hr@10']:.5f} "
              f"users {theirs['users']} missing {theirs['missing']} -> {'agree' if ok else 'DISAGREE'}")
    print("\n" + metrics_table(metrics))
    gen, sas = metrics["generative"]["ndcg@10"], metrics.get("sasrec", {}).get("ndcg@10", float("nan"))
    print(f"\ntarget generative NDCG@10 >= SASRec: {gen:.4f} vs {sas:.4f} -> {'MET' if gen >= sas else 'NOT MET'}")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
