"""pipeline: the stages in order, on one Ray (the top layer; `jobs/` are thin entries into it).

Owns: PipelineConfig, the stage order and Ray start-up (`run`), and each stage's artifacts:
calling the stage core and writing its Parquet / JSON (`stages`).
May import: digr.platform, digr.data, digr.evidence, digr.tokenizer, digr.rec, digr.rl, digr.llmrec, digr.eval, digr.serving (everything; nothing in digr imports it).
"""
