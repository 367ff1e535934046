"""The SID token vocabulary and the TIGER-style encoder-decoder built on it.

A Semantic ID is a fixed-length tuple of `levels + 1` codes: `levels` RQ-VAE codes
(each in [0, codebook_size)) and one suffix code in [0, suffix_size) that is 0 unless
the first `levels` codes collide with another item's. Every level has its own token
range, so the same code at two levels is two different tokens (TIGER, Rajput et al. 2023):

    PAD = 0 (also T5's decoder start token), EOS = 1,
    token(level l, code c) = 2 + l * codebook_size + c   for l < levels,
    token(suffix, c)       = 2 + levels * codebook_size + c.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import T5Config, T5ForConditionalGeneration

PAD = 0
EOS = 1
_FIRST = 2


@dataclass(frozen=True)
class SidVocab:
    levels: int = 3
    codebook_size: int = 256
    suffix_size: int = 1

    @property
    def sid_len(self) -> int:
        """Tokens per item: the RQ-VAE codes plus the suffix code."""
        return self.levels + 1

    @property
    def vocab_size(self) -> int:
        return _FIRST + self.levels * self.codebook_size + self.suffix_size

    def level_size(self, level: int) -> int:
        """Number of codes at `level` (0-based; `levels` is the suffix level)."""
        return self.codebook_size if level < self.levels else self.suffix_size

    def level_offset(self, level: int) -> int:
        """Token id of code 0 at `level`."""
        return _FIRST + level * self.codebook_size

    def encode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: (..., sid_len) int64 codes -> (..., sid_len) int64 token ids."""
        offsets = torch.tensor(
            [self.level_offset(lv) for lv in range(self.sid_len)], dtype=torch.long, device=codes.device
        )
        return codes.long() + offsets

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (..., sid_len) int64 token ids -> (..., sid_len) codes (inverse of `encode`)."""
        offsets = torch.tensor(
            [self.level_offset(lv) for lv in range(self.sid_len)], dtype=torch.long, device=tokens.device
        )
        return tokens.long() - offsets


@dataclass(frozen=True)
class ModelConfig:
    """A small T5 (TIGER used 4+4 layers, d_model 128, 6 heads, d_ff 1024, dropout 0.1)."""

    d_model: int = 128
    d_kv: int = 64
    d_ff: int = 1024
    num_layers: int = 4
    num_decoder_layers: int = 4
    num_heads: int = 6
    dropout: float = 0.1


def build_t5(vocab: SidVocab, cfg: ModelConfig) -> T5ForConditionalGeneration:
    """A randomly initialised T5 over the SID vocabulary (no text vocabulary)."""
    t5 = T5Config(
        vocab_size=vocab.vocab_size,
        d_model=cfg.d_model,
        d_kv=cfg.d_kv,
        d_ff=cfg.d_ff,
        num_layers=cfg.num_layers,
        num_decoder_layers=cfg.num_decoder_layers,
        num_heads=cfg.num_heads,
        dropout_rate=cfg.dropout,
        feed_forward_proj="relu",
        pad_token_id=PAD,
        eos_token_id=EOS,
        decoder_start_token_id=PAD,
        tie_word_embeddings=False,
    )
    return T5ForConditionalGeneration(t5)


def encode_histories(
    histories: list[list[int]], sid_tokens: torch.Tensor, max_items: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten each history (item indices, oldest first) into SID tokens + EOS.

    sid_tokens: (N_items, sid_len) token ids per item. Keeps the last `max_items` items.
    Returns input_ids (B, T) right-padded with PAD and attention_mask (B, T), where
    T = max_items_in_batch * sid_len + 1.
    """
    sid_len = sid_tokens.shape[1]
    kept = [h[-max_items:] if max_items > 0 else h for h in histories]
    width = max((len(h) for h in kept), default=0) * sid_len + 1
    input_ids = torch.full((len(kept), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(kept), width), dtype=torch.long)
    for row, h in enumerate(kept):
        toks = sid_tokens[torch.as_tensor(h, dtype=torch.long)].reshape(-1) if h else sid_tokens.new_empty(0)
        n = toks.numel()
        input_ids[row, :n] = toks
        input_ids[row, n] = EOS
        mask[row, : n + 1] = 1
    return input_ids, mask
