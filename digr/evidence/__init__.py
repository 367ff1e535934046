"""evidence: what is known about each item before it is quantised (DeepInterestGR's CMSA / DCIM / RLDI).

Owns: LLM backends on Ray Data, transformers / HTTP / vLLM (`llm`); step-by-step intent mining
and the multi-LLM merge (`mine`, `intent_json`); the RLDI descriptor classifier and q_i
(`label`); image fetch, vectors and tags (`images`); recommendation-focused captions
(`caption`); the text embedding actor pool and IEID evidence vectors (`embed`); versioned
prompt files (`prompts/`) and the ImageNet class names (`imagenet_classes.txt`).
May import: digr.platform, digr.data.
"""
