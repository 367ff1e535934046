"""Ingest: raw data -> items, sequences, leave-last-out examples, quarantine (Parquet).

Local (embedded MovieLens-100K default, or a config):
    python -m jobs.ingest --output runs/ml100k
    python -m jobs.ingest --config configs/scientific.yaml --output runs/scientific sft.epochs=20
On a Ray cluster (the working directory travels with the job):
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.ingest --config configs/scientific.yaml --output s3://bucket/runs/scientific
"""

import sys

from jobs._cli import main

if __name__ == "__main__":
    sys.exit(main("ingest"))
