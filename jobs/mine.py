"""Mine: LLM intent mining (DCIM / MLIM) for every item, on Ray Data (runs ingest first if needed).

Local (embedded MovieLens-100K default; SmolLM2-135M-Instruct on CPU actors, ~8 s an item here):
    python -m jobs.mine --output runs/ml100k mine.max_items=50
    python -m jobs.mine --config configs/scientific.yaml --output runs/scientific
Several models at once (multi-LLM mining), e.g. an OpenAI-compatible endpoint beside SmolLM2:
    OPENAI_API_KEY=... python -m jobs.mine --output runs/ml100k \
        'mine.models=[{backend: transformers}, {backend: http, name: gpt, model: gpt-4o-mini,
                       http: {url: "https://api.openai.com/v1/chat/completions", api_key_env: OPENAI_API_KEY,
                              rate_limit: 5}}]'
On a Ray cluster (vLLM engines on GPU actors):
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.mine --output s3://bucket/runs/sci \
        'mine.models=[{backend: vllm, model: Qwen/Qwen2.5-7B-Instruct, vllm: {concurrency: 4}}]'
Writes <output>/mine/intents.parquet and failures.parquet; replies are cached in
<output>/mine_cache/ so a re-run asks nothing and a killed run resumes.
"""

import sys

from jobs._cli import main

if __name__ == "__main__":
    sys.exit(main("mine"))
