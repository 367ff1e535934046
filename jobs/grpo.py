"""GRPO: improve the SFT model with the quality-aware, relevance-gated reward (runs the stages before it if needed).

Local (embedded MovieLens-100K default; plain data parallel on gloo):
    python -m jobs.grpo --output runs/ml100k grpo.steps=100
DeepSpeed ZeRO-2 on two CPU workers:
    python -m jobs.grpo --output runs/ml100k grpo.strategy=deepspeed grpo.deepspeed.zero_stage=2 \
        grpo.scaling.num_workers=2
Beam-as-group rollouts (MiniOneRec) and the rule reward without the quality bonus:
    python -m jobs.grpo --output runs/ml100k grpo.rollout=beam grpo.reward.qarm=0
Writes <output>/grpo/model (the best step by valid NDCG@10) and history.json; re-running the
same command after a kill resumes from the last checkpoint. With `grpo.enabled=true` the whole
pipeline runs it and the evaluate stage ranks both models.
"""

import sys

from jobs._cli import main

if __name__ == "__main__":
    sys.exit(main("grpo"))
