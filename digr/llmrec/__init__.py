"""llmrec: a decoder-only LLM as the recommender backbone (SID tokens in a causal LM).

Owns: SID tokens added to a causal LM, LoRA, alignment tasks, SFT and GRPO on Ray Train and
the trie as a transformers logits processor (`backbone`), and the same constraint as a vLLM
V1 logits processor (`vllm_sid`, the only module here that imports vLLM).
May import: digr.platform, digr.data, digr.evidence, digr.tokenizer, digr.rec, digr.rl.
"""
