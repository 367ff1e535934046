"""SID-constrained decoding in vLLM (V1 engine): the trie of valid SIDs as a vLLM logits
processor, so a backbone served or batch-run by vLLM only ever emits SIDs of real items.

vLLM loads logits processors as classes in its engine process, so this module imports vLLM at
the top: only the vLLM path imports it (`digr.llmrec.backbone` stays importable without vLLM).

    LLM(model=MERGED_BACKBONE_DIR, logits_processors=[LOGITS_PROCESSOR])
    SamplingParams(max_tokens=sid_len + 1, extra_args=sid_extra_args(trie_path, table_path, eos_id))

Requests without the "digr_sid" extra argument are left alone. The model must carry the SID
tokens in its own vocabulary: `digr.llmrec.backbone.export_merged_backbone` turns a trained backbone
folder (LoRA or full) into such a folder, with `sid_table.pt` beside.
"""

from __future__ import annotations

import io
from functools import lru_cache
from typing import Any

import torch
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

from digr.llmrec.backbone import SidRequestLogitsProcessor

EXTRA_KEY = "digr_sid"
LOGITS_PROCESSOR = "digr.llmrec.vllm_sid:SidTrieLogitsProcessor"  # the FQCN vLLM's engine imports


def sid_extra_args(trie_path: str, table_path: str, eos_token_id: int) -> dict[str, Any]:
    """`SamplingParams.extra_args` that turn the constraint on for a request: the trie
    (`tokenize/trie.npz`, local or s3://), the SID token table (`sid_table.pt` of a backbone
    folder) and the EOS id that ends a SID."""
    return {EXTRA_KEY: {"trie": trie_path, "table": table_path, "eos": int(eos_token_id)}}


@lru_cache(maxsize=8)
def _constraint(trie_path: str, table_path: str, eos_token_id: int) -> SidRequestLogitsProcessor:
    """One constraint per (trie, table, eos), loaded once per engine process."""
    from digr.platform import storage
    from digr.rec.trie import SidTrie

    table = torch.load(io.BytesIO(storage.read_bytes(table_path)))
    return SidRequestLogitsProcessor(SidTrie.from_bytes(storage.read_bytes(trie_path)), table, eos_token_id)


class SidTrieLogitsProcessor(AdapterLogitsProcessor):
    """vLLM's adapter for per-request processors: each request that names a trie in its
    extra args gets that trie's `SidRequestLogitsProcessor`."""

    def is_argmax_invariant(self) -> bool:
        return False  # masking changes the greedy choice

    def new_req_logits_processor(self, params: Any) -> SidRequestLogitsProcessor | None:
        spec = (getattr(params, "extra_args", None) or {}).get(EXTRA_KEY)
        if not spec:
            return None
        return _constraint(str(spec["trie"]), str(spec["table"]), int(spec["eos"]))
