"""Embed: item text -> sentence embeddings, a Ray Data actor pool (runs ingest first if needed).

Local (embedded MovieLens-100K default, or a config):
    python -m jobs.embed --output runs/ml100k
    python -m jobs.embed --config configs/scientific.yaml --output runs/scientific sft.epochs=20
On a Ray cluster (the working directory travels with the job):
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.embed --config configs/scientific.yaml --output s3://bucket/runs/scientific
"""

import sys

from jobs._cli import main

if __name__ == "__main__":
    sys.exit(main("embed"))
