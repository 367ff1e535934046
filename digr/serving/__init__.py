"""serving: the pure core behind the Ray Serve app in `serve/app.py`.

Owns: request checks, sticky A/B assignment, the live catalogue, SIDs for new items through
the frozen tokenizer, and the addition log (`core`).
May import: digr.platform, digr.data, digr.evidence, digr.tokenizer, digr.rec.
"""
