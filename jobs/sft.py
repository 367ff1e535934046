"""SFT: the T5 recommender learns history -> next SID on Ray Train; resumes from its last checkpoint.

Local (embedded MovieLens-100K default, or a config):
    python -m jobs.sft --output runs/ml100k
    python -m jobs.sft --config configs/scientific.yaml --output runs/scientific sft.epochs=20
On a Ray cluster (the working directory travels with the job):
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.sft --config configs/scientific.yaml --output s3://bucket/runs/scientific
"""

import sys

from jobs._cli import main

if __name__ == "__main__":
    sys.exit(main("sft"))
