"""tokenizer: item embeddings -> Semantic IDs (IEID).

Owns: the CMSA projection and fusion (`fusion`), the RQ-VAE and residual k-means
(`rqvae`), collision suffixes and codebook statistics (`sids`), and the tokenize stage on
Ray Train (`tokenize`).
May import: digr.platform, digr.data, digr.evidence.
"""
