"""Entry points, one per stage plus the whole pipeline: `python -m jobs.<stage>`."""
