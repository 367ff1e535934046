"""digr: generative recommendation with intent-rich Semantic IDs, on Ray."""

__version__ = "0.1.0"
