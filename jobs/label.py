"""Label (RLDI): classify every mined intent good/bad and write q_i per item (runs ingest and mine first if needed).

Rule labels only (the default):
    python -m jobs.label --output runs/ml100k mine.max_items=50
With an LLM judge on a sample of 200 items (any digr.evidence.llm backend, e.g. an OpenAI-compatible endpoint):
    OPENAI_API_KEY=... python -m jobs.label --output runs/ml100k \
        'label.judges=[{backend: http, name: judge, model: gpt-4o-mini,
                        http: {url: "https://api.openai.com/v1/chat/completions", api_key_env: OPENAI_API_KEY}}]'
Writes <output>/label/labels.parquet (per descriptor), quality.parquet (item_idx, item_id, q,
n_intents: what the RL reward's quality bonus reads), classifier.pt, classifier.json, judge_failures.parquet.
"""

import sys

from jobs._cli import main

if __name__ == "__main__":
    sys.exit(main("label"))
