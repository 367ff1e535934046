"""eval: every model ranked on the test split, side by side, and the run's report.

Owns: the reference models every table compares against, popularity and SASRec
(`baselines`), the evaluate stage that ranks on Ray Data (`evaluate`), and the metrics table,
report.md and plots (`report`).
May import: digr.platform, digr.data, digr.evidence, digr.tokenizer, digr.rec, digr.rl.
"""
