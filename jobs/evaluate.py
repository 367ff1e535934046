"""Evaluate: HR/NDCG@5/10 on the test split for the generative model, popularity and SASRec.

Local (embedded MovieLens-100K default, or a config):
    python -m jobs.evaluate --output runs/ml100k
    python -m jobs.evaluate --config configs/scientific.yaml --output runs/scientific sft.epochs=20
On a Ray cluster (the working directory travels with the job):
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.evaluate --config configs/scientific.yaml --output s3://bucket/runs/scientific
"""

import sys

from jobs._cli import main

if __name__ == "__main__":
    sys.exit(main("evaluate"))
