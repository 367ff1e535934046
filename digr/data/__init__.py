"""data: raw interaction logs in, clean splits out, and how predictions on them are scored.

Owns: readers for MovieLens-100K, inter-json and Amazon 2014/2018/2023 dumps (`formats`),
k-core filtering, leave-last-out splits and the quarantine of bad rows (`ingest`), and the
ranking metrics (HR@K, NDCG@K) and predictions JSONL every model is scored by (`metrics`).
May import: digr.platform.
"""
