"""The SID token vocabulary and the encoder-decoder recommender built on it.

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
import torch.nn.functional as F
from transformers import T5Config, T5ForConditionalGeneration

from digr.rec.rows import append_rows

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


ENCODER_INPUTS = ("items", "sid_tokens")


@dataclass(frozen=True)
class ModelConfig:
    """A small T5 (TIGER used 4+4 layers, d_model 128, 6 heads, d_ff 1024, dropout 0.1).

    encoder_input: what one encoder position is.
      "sid_tokens": TIGER's layout, every history item flattened into its `sid_len` SID tokens.
      "items": one position per history item, the sum of its SID tokens' embeddings (the
        same table the decoder uses), plus a learned item embedding (`item_embedding`) and a
        linear projection of the item's content vector (`content_features`: the embed
        stage's vector, frozen). Sequences are `sid_len` times shorter, so training and
        decoding cost about a quarter, and on Amazon Scientific test NDCG@10 rose from
        0.0435 to 0.0498 at the same size (docs/results.md). The decoder still
        generates SIDs only.
    """

    d_model: int = 128
    d_kv: int = 64
    d_ff: int = 1024
    num_layers: int = 4
    num_decoder_layers: int = 4
    num_heads: int = 6
    dropout: float = 0.1
    encoder_input: str = "items"
    item_embedding: bool = True
    content_features: bool = True
    # Share the SID-token table between the encoder's input, the decoder's input and the output
    # layer (T5's tie_word_embeddings, which also scales the decoder output by d_model^-0.5), as
    # SASRec shares its item table: a token's output vector then also learns from histories.
    tie_embeddings: bool = False
    # "items" layout: a learned embedding of each position's recency (0 = the latest item, 1 the
    # one before, ...; older than recency_positions - 1 share the last row) added to its vector.
    # T5's encoder has only relative position biases and its cross-attention none, so without it
    # the decoder cannot tell the latest item from an older one. 0 = off.
    recency_positions: int = 0

    def __post_init__(self) -> None:
        if self.encoder_input not in ENCODER_INPUTS:
            raise ValueError(f"sft.model.encoder_input must be one of {ENCODER_INPUTS}, got {self.encoder_input!r}")
        for name in ("d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"sft.model.{name} must be >= 1, got {getattr(self, name)}")
        if self.recency_positions < 0:
            raise ValueError(f"sft.model.recency_positions must be >= 0, got {self.recency_positions}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"sft.model.dropout must be in [0, 1), got {self.dropout}")


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
        tie_word_embeddings=cfg.tie_embeddings,
    )
    return T5ForConditionalGeneration(t5)


def recency_index(attention_mask: torch.Tensor, positions: int) -> torch.Tensor:
    """(B, L) 1/0 mask, any padding side -> (B, L) int64: how many real positions come after
    each position (0 = the latest item), capped at positions - 1; 0 on padding.

    E.g. mask [[1, 1, 1, 0], [0, 1, 1, 1]], positions 2 -> [[1, 1, 0, 0], [0, 1, 1, 0]].
    """
    mask = attention_mask.long()
    after = mask.sum(1, keepdim=True) - mask.cumsum(1)  # real positions strictly after each one
    return (after * mask).clamp(max=positions - 1)


def item_histories(histories: list[list[int]], max_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The last `max_items` item indices of each history, one position per item.

    Returns items (B, L) int64 right-padded with 0 and attention_mask (B, L), L = longest kept
    history in the batch (at least 1: an empty history is one masked position).
    """
    kept = [h[-max_items:] if max_items > 0 else h for h in histories]
    width = max((len(h) for h in kept), default=0) or 1
    items = torch.zeros((len(kept), width), dtype=torch.long)
    mask = torch.zeros((len(kept), width), dtype=torch.long)
    for row, h in enumerate(kept):
        items[row, : len(h)] = torch.as_tensor(h, dtype=torch.long)
        mask[row, : len(h)] = 1
    return items, mask


def history_inputs(histories: list[list[int]], sid_tokens: torch.Tensor, max_items: int,
                   encoder_input: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (B, T): `item_histories` for "items", else `encode_histories`."""
    if encoder_input == "items":
        return item_histories(histories, max_items)
    return encode_histories(histories, sid_tokens, max_items)


class SidRecommender(torch.nn.Module):
    """The T5 plus what turns a history into encoder inputs (`ModelConfig.encoder_input`).

    sid_tokens: (N_items, sid_len) int64 token ids (`vocab.encode(sids)`), kept as a buffer.
    features: (N_items, F) float32 item content vectors, a frozen buffer; needed only when
    `cfg.content_features` and `encoder_input == "items"`.
    """

    def __init__(self, vocab: SidVocab, cfg: ModelConfig, sid_tokens: torch.Tensor,
                 features: torch.Tensor | None = None) -> None:
        super().__init__()
        if sid_tokens.ndim != 2 or sid_tokens.shape[1] != vocab.sid_len:
            raise ValueError(f"sid_tokens must be (N_items, sid_len={vocab.sid_len}), got {tuple(sid_tokens.shape)}")
        self.vocab, self.cfg = vocab, cfg
        self.t5 = build_t5(vocab, cfg)
        self.register_buffer("sid_tokens", sid_tokens.long().clone())
        items = cfg.encoder_input == "items"
        n_items = sid_tokens.shape[0]
        self.item = torch.nn.Embedding(n_items, cfg.d_model) if items and cfg.item_embedding else None
        if self.item is not None:
            torch.nn.init.normal_(self.item.weight, std=0.1)
        self.recency = (torch.nn.Embedding(cfg.recency_positions, cfg.d_model)
                        if items and cfg.recency_positions else None)
        if self.recency is not None:
            torch.nn.init.normal_(self.recency.weight, std=0.1)
        self.content: torch.nn.Linear | None = None
        if items and cfg.content_features:
            if features is None or features.ndim != 2 or features.shape[0] != n_items:
                got = None if features is None else tuple(features.shape)
                raise ValueError(f"content_features needs features of shape (N_items={n_items}, F), got {got}")
            self.register_buffer("features", features.float().clone())
            self.content = torch.nn.Linear(features.shape[1], cfg.d_model, bias=False)

    @property
    def n_items(self) -> int:
        return int(self.sid_tokens.shape[0])

    def batch(self, histories: list[list[int]], max_items: int) -> tuple[torch.Tensor, torch.Tensor]:
        """B item_idx histories -> (input_ids, attention_mask), each (B, T), on CPU.

        input_ids are item indices ("items") or SID token ids ("sid_tokens"); `encoder_kwargs`
        turns them into what the T5 encoder takes.
        """
        return history_inputs(histories, self.sid_tokens.cpu(), max_items, self.cfg.encoder_input)

    def encoder_kwargs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"input_ids"} for "sid_tokens"; {"inputs_embeds": (B, L, d_model)} for "items"."""
        if self.cfg.encoder_input != "items":
            return {"input_ids": input_ids}
        x = self.item_vectors(input_ids)  # (B, L, d)
        if self.recency is not None:
            x = x + self.recency(recency_index(attention_mask, self.recency.num_embeddings))
        return {"inputs_embeds": x * attention_mask.unsqueeze(-1).to(x.dtype)}

    def item_vectors(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """(..., d_model) items as the encoder reads them: the sum of their SID tokens'
        embeddings, plus the learned item embedding and the projected content vector where the
        model has them. ids: item_idx of any shape; None = every item, (N_items, d_model), the
        item side of the dense head (`dense_logits`)."""
        if ids is None:
            ids = torch.arange(self.n_items, device=self.sid_tokens.device)
        x = self.t5.shared(self.sid_tokens[ids]).sum(dim=-2)  # (..., sid_len, d) -> (..., d)
        if self.item is not None:
            x = x + self.item(ids)
        if self.content is not None:
            x = x + self.content(self.features[ids])
        return x

    def dense_logits(self, query: torch.Tensor) -> torch.Tensor:
        """query: (B, d_model) the decoder's output at its start position -> (B, N_items) logits
        of the next item, query . item_vectors / sqrt(d_model) (LIGER-style dense retrieval next to
        the generative head; no parameters of its own)."""
        return query @ self.item_vectors().T * self.cfg.d_model**-0.5

    def dense_query(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) histories -> (B, d_model) decoder output at the start position (before lm_head)."""
        t5 = self.t5
        enc = t5.encoder(**self.encoder_kwargs(input_ids, attention_mask), attention_mask=attention_mask)
        start = torch.full((input_ids.shape[0], 1), PAD, dtype=torch.long, device=input_ids.device)
        dec = t5.decoder(input_ids=start, encoder_hidden_states=enc.last_hidden_state,
                         encoder_attention_mask=attention_mask)
        return dec.last_hidden_state[:, 0]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                weights: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                dense_weight: float = 0.0) -> torch.Tensor:
        """Mean cross-entropy of the (B, sid_len) target tokens; T5 shifts labels right, starting from PAD.
        weights: (B,) per-example weights -> the weighted mean of the examples' mean token losses.
        dense_weight > 0 adds that times the dense head's cross-entropy over all items for
        targets (B,) item_idx (same per-example weights)."""
        t5 = self.t5
        enc = t5.encoder(**self.encoder_kwargs(input_ids, attention_mask), attention_mask=attention_mask)
        dec = t5.decoder(input_ids=t5._shift_right(labels), encoder_hidden_states=enc.last_hidden_state,
                         encoder_attention_mask=attention_mask).last_hidden_state  # (B, sid_len, d)
        out = dec * t5.model_dim**-0.5 if t5.config.scale_decoder_outputs else dec
        per_row = F.cross_entropy(t5.lm_head(out).transpose(1, 2), labels, reduction="none").mean(dim=1)  # (B,)
        if dense_weight:
            if targets is None:
                raise ValueError("dense_weight > 0 needs targets (B,) item_idx")
            per_row = per_row + dense_weight * F.cross_entropy(self.dense_logits(dec[:, 0]), targets, reduction="none")
        if weights is None:
            return per_row.mean()
        return (per_row * weights).sum() / weights.sum()

    @torch.no_grad()
    def add_items(self, sid_tokens: torch.Tensor, features: torch.Tensor | None = None) -> None:
        """Make M new items servable without training: (M, sid_len) token ids, and (M, F)
        content vectors when the model reads them. A new item's learned embedding starts at
        zero (nothing was learned about it); its SID tokens and content vector still place it."""
        if sid_tokens.ndim != 2 or sid_tokens.shape[1] != self.vocab.sid_len:
            raise ValueError(f"sid_tokens must be (M, sid_len={self.vocab.sid_len}), got {tuple(sid_tokens.shape)}")
        m = sid_tokens.shape[0]
        if self.content is not None:
            if features is None or features.shape != (m, self.features.shape[1]):
                raise ValueError(f"features must be (M={m}, {self.features.shape[1]}), got "
                                 f"{None if features is None else tuple(features.shape)}")
            self.features = append_rows(self.features, features)
        self.sid_tokens = append_rows(self.sid_tokens, sid_tokens)
        if self.item is not None:
            old = self.item.weight.detach()
            # From the grown tensor directly: a fresh Embedding(N + m, d) would first draw N + m
            # random rows only to overwrite them (1.2 CPU s at 1M items). append_rows: O(m), not O(N).
            self.item = torch.nn.Embedding.from_pretrained(append_rows(old, old.new_zeros(m, old.shape[1])),
                                                           freeze=not self.item.weight.requires_grad)

    @classmethod
    def from_state(cls, vocab: SidVocab, cfg: ModelConfig, state: dict[str, torch.Tensor]) -> "SidRecommender":
        """Rebuild from a `state_dict()` (the buffers carry the SIDs and features)."""
        model = cls(vocab, cfg, state["sid_tokens"], state.get("features"))
        model.load_state_dict(state)
        return model


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
