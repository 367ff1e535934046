"""abtest: what users did with each A/B variant's recommendations, and which variant won.

Owns: the exposure and feedback record schemas, joining them, per-variant metrics with
confidence intervals, the lift, the sample-ratio-mismatch check and the verdict (`analysis`).
May import: digr.platform, digr.data.
"""
