"""Constrained beam search over the SID trie: the one decoder evaluation, serving and RL share.

The search is the one Hugging Face runs for
`generate(num_beams=W, prefix_allowed_tokens_fn=<trie>, max_new_tokens=sid_len)`, so the
results are the same: at each step the scores are log_softmax over the FULL vocabulary,
tokens the trie does not allow get -inf (no renormalisation), a beam's score is the running
sum, and beams are ranked by that sum (all SIDs have the same length, so HF's length
penalty cannot change the ranking).

It is faster than `generate` because it never repeats work across the beams of one history:

* the encoder runs once per history, and the cross-attention keys/values are projected
  once per history, (B, H, S, dk), instead of once per beam;
* in cross-attention the W beams of a history are fed as W query positions against that
  history's keys, (B, H, W, dk) x (B, H, S, dk); T5 has no position bias in
  cross-attention, so this is exact and the keys are never copied W times;
* the first step runs on B rows (all beams start from the same decoder start token), and
  its self-attention keys/values stay B rows, broadcast to the beams, never copied;
* the decoder's first self-attention sublayer sees only the decoder's own tokens (the start
  token and the codes chosen so far), never the history, so its output is a function of the
  trie prefix alone: `prefix_states` computes it once for every prefix and the search looks
  it up (`_cached_prefix_states` keeps it while the weights and the trie stay the same);
* the trie is a dense table per level, so masking the candidates is one gather;
* on CPU the matrix products go to oneDNN (`_linear`), whose fp32 GEMM uses AVX-512 where
  MKL's (behind `F.linear`) may not: 2.2x the GFLOP/s on the AMD EPYC of our benchmarks
  (docs/results.md); the results agree with `F.linear` to float rounding.

The encoder and decoder layers are driven here directly (their own Linear / LayerNorm
modules), because HF's T5Attention cannot take B-row cross keys with B*W-row queries, and so
that every matrix product goes through `_linear`. Tests check both against HF's forward.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import T5ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.t5.modeling_t5 import T5DenseActDense

from digr.rec.rows import append_rows
from digr.rec.seqmodel import PAD, SidRecommender, SidVocab
from digr.rec.trie import SidTrie

KV = tuple[torch.Tensor, torch.Tensor]
Cache = tuple[list[torch.Tensor], list[torch.Tensor]]  # per-position keys, values, each (B, W_p, H, dk)


@dataclass(frozen=True, eq=False)
class BeamOutput:
    """Best `top_k` SIDs per history, best first.

    items: (B, K) int64 item index, -1 where fewer than K valid items were found.
    scores: (B, K) float32 sum of the SID tokens' log-probs, -inf where items is -1.
    sids: (B, K, sid_len) int64 codes (not token ids), -1 where items is -1.
    """

    items: torch.Tensor
    scores: torch.Tensor
    sids: torch.Tensor


# oneDNN's fused linear (+ ReLU). It is PyTorch's own op (Inductor's CPU backend lowers Linear to it), not a
# public API, so it is looked up once and the module's own call is the fallback wherever it is missing.
_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None


def _linear(x: torch.Tensor, layer: nn.Linear, relu: bool = False) -> torch.Tensor:
    """layer(x), then ReLU if asked: (..., in) -> (..., out).

    Why not `layer(x)`: on CPU `F.linear` calls MKL's sgemm, which on AMD CPUs takes its AVX2
    path; oneDNN dispatches on the instruction set and runs AVX-512 there (measured 450 vs 200
    GFLOP/s for the decoder's (1280 x 128) @ (128 x 1024)), and fuses the ReLU into the GEMM.
    """
    w = layer.weight
    # The module call is the fallback, not F.linear: under DeepSpeed ZeRO-3 (GRPO rollouts)
    # `weight` is an empty placeholder that only the module's forward hooks gather.
    if (_ONEDNN_LINEAR is not None and x.device.type == "cpu" and x.dtype == w.dtype == torch.float32
            and w.shape == (layer.out_features, layer.in_features)):
        return _ONEDNN_LINEAR(x, w, layer.bias, "relu" if relu else "none", [], "")
    y = layer(x)
    return F.relu(y) if relu else y


def _feed_forward(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """T5LayerFF in eval mode, h + DenseReluDense(layer_norm(h)); (N, d) -> (N, d).
    The plain ReLU variant (TIGER's and ours) runs through `_linear`; any other is called as is."""
    ff = layer.DenseReluDense
    if not (isinstance(ff, T5DenseActDense) and isinstance(ff.act, nn.ReLU)):
        return layer(h)
    return h + _linear(_linear(layer.layer_norm(h), ff.wi, relu=True), ff.wo)


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(N, T, H * dk) -> (N, H, T, dk)."""
    n, t, _ = x.shape
    return x.view(n, t, n_heads, -1).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """(N, H, T, dk) -> (N, T, H * dk)."""
    n, h, t, dk = x.shape
    return x.transpose(1, 2).reshape(n, t, h * dk)


def _additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, S) 1/0 -> (B, 1, 1, S): 0 where attended, the dtype's minimum on padding."""
    mask = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
    return mask.masked_fill(attention_mask == 0, torch.finfo(dtype).min)[:, None, None, :]


def _cross_kv(model: T5ForConditionalGeneration, enc: torch.Tensor) -> list[KV]:
    """enc: (B, S, d) encoder output -> per decoder layer (keys transposed, values), (B, H, dk, S)
    and (B, H, S, dk), both contiguous: every decoder step multiplies by them without a copy."""
    out = []
    for block in model.decoder.block:
        att = block.layer[1].EncDecAttention
        keys = _heads(_linear(enc, att.k), att.n_heads).transpose(-1, -2).contiguous()
        out.append((keys, _heads(_linear(enc, att.v), att.n_heads).contiguous()))
    return out


def _encode(model: T5ForConditionalGeneration, attention_mask: torch.Tensor, input_ids: torch.Tensor | None = None,
            inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """T5's encoder in eval mode, `model.encoder(...).last_hidden_state`, with its matrix
    products through `_linear`. attention_mask: (B, S); input_ids (B, S) or inputs_embeds
    (B, S, d). Returns (B, S, d)."""
    enc = model.encoder
    h = enc.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
    b, s, _ = h.shape
    # T5 shares layer 0's bidirectional relative position bias across layers: (1, H, S, S).
    bias = enc.block[0].layer[0].SelfAttention.compute_bias(s, s, device=h.device).to(h.dtype)
    bias = bias + _additive_mask(attention_mask, h.dtype)  # (B, H, S, S), added as HF adds them
    for block in enc.block:
        sa = block.layer[0]
        att = sa.SelfAttention
        x = sa.layer_norm(h)
        q, k, v = (_heads(_linear(x, proj), att.n_heads) for proj in (att.q, att.k, att.v))  # (B, H, S, dk)
        weights = torch.softmax(q @ k.transpose(-1, -2) + bias, dim=-1)  # T5 does not scale q.k
        h = h + _linear(_merge(weights @ v), att.o)
        h = _feed_forward(block.layer[1], h)
    return enc.final_layer_norm(h)


def _encoder_states(model: T5ForConditionalGeneration, attention_mask: torch.Tensor,
                    **encoder_inputs: torch.Tensor | None) -> tuple[list[KV], torch.Tensor]:
    """What every decoder step reads: `_cross_kv` of the encoder output, and the (B, 1, 1, S)
    additive cross-attention mask. encoder_inputs: input_ids or inputs_embeds, as `_encode`."""
    enc = _encode(model, attention_mask, **encoder_inputs)
    return _cross_kv(model, enc), _additive_mask(attention_mask, enc.dtype)


def _self_attention_step(layer: nn.Module, h: torch.Tensor, b: int, w: int, pk: list[torch.Tensor],
                         pv: list[torch.Tensor], bias: torch.Tensor) -> torch.Tensor:
    """T5LayerSelfAttention for one new position of W beams per history, cached; (N, d) -> (N, d).

    h: (N, d), N = B * W; pk, pv: this layer's per-position keys/values (see `_decoder_step`),
    this position's are appended; bias: (t + 1, 1, 1, H) relative position bias, t = len(pk).
    """
    att = layer.SelfAttention
    x = layer.layer_norm(h)
    q, k, v = (_linear(x, proj).view(b, w, att.n_heads, -1) for proj in (att.q, att.k, att.v))  # (B, W, H, dk)
    pk.append(k)
    pv.append(v)
    # T5 does not scale q.k; the single new query may see every past position. Positions
    # lead (dim 0): a softmax over a short last dim is slow, and weights[p] is contiguous.
    logits = torch.stack([(q * kp).sum(-1) for kp in pk]) + bias  # (t + 1, B, W, H)
    weights = torch.softmax(logits, dim=0).unsqueeze(-1)  # (t + 1, B, W, H, 1)
    o = weights[0] * pv[0]
    for p in range(1, len(pk)):
        o += weights[p] * pv[p]
    return h + _linear(o.view(b * w, -1), att.o)


def _decoder_step(
    model: T5ForConditionalGeneration,
    tokens: torch.Tensor,
    past: list[Cache],
    cross: list[KV],
    cross_mask: torch.Tensor,
    first: torch.Tensor | None = None,
) -> torch.Tensor:
    """One cached decoder step for W beams per history; appends this step's keys/values to `past`.

    tokens: (B, W) int64, the token each beam consumes now (at position t, the number of
    earlier positions). past: per layer (keys, values), each a list of t tensors (B, W_p, H, dk),
    one per earlier position: W_p = 1 where the position is shared by all beams of a history
    (the start token), else W_p = W. cross: `_cross_kv`'s per layer (keys (B, H, dk, S),
    values (B, H, S, dk)); cross_mask: (B, 1, 1, S) additive. first: optional (B * W, d), the
    first layer's self-attention output for these beams' prefixes (`prefix_states`): that
    sublayer is then skipped and its cache, past[0], stays empty. Returns logits (B, W, V) for
    the next token. Mirrors T5Stack/T5Block in eval mode (dropout is the identity there).

    Attention is written out by hand: with one query over at most sid_len keys (self) or W
    queries over S keys (cross), the products are tiny and a fused SDPA kernel's fixed cost per
    call outweighs them; keeping the cache as one tensor per position also avoids re-copying
    the whole cache with `cat` at every step, and a shared position is broadcast, never copied.
    """
    dec = model.decoder
    b, w = tokens.shape
    h = dec.embed_tokens(tokens).view(b * w, -1) if first is None else first  # (N, d), N = B * W
    t = max(len(pk) for pk, _ in past)  # past[0] is empty when `first` stands in for layer 0
    # T5 shares layer 0's relative position bias across layers; one query at position t.
    bias = dec.block[0].layer[0].SelfAttention.compute_bias(1, t + 1, device=h.device, past_seen_tokens=t)
    bias = bias.view(-1, t + 1).t().reshape(t + 1, 1, 1, -1).to(h.dtype)  # (t + 1, 1, 1, H)
    for i, (block, (pk, pv), (ck, cv)) in enumerate(zip(dec.block, past, cross)):
        if i > 0 or first is None:
            h = _self_attention_step(block.layer[0], h, b, w, pk, pv, bias)

        ca = block.layer[1]
        att = ca.EncDecAttention
        x = ca.layer_norm(h).view(b, w, -1)  # the W beams become W query positions of one row
        q = _heads(_linear(x, att.q), att.n_heads)  # (B, H, W, dk)
        weights = torch.softmax(q @ ck + cross_mask, dim=-1)  # (B, H, W, S)
        h = h + _linear(_merge(weights @ cv), att.o).view(b * w, -1)

        h = _feed_forward(block.layer[2], h)
    h = dec.final_layer_norm(h)
    if getattr(model.config, "scale_decoder_outputs", model.config.tie_word_embeddings):
        h = h * (model.config.d_model**-0.5)
    return _linear(h, model.lm_head).view(b, w, -1)


# Prefix states for a catalogue larger than this are not built (the search computes the layer).
PREFIX_STATES_MAX_BYTES = 1 * 2**30  # about 2M prefixes at d_model 128


def _first_layer_weights(model: T5ForConditionalGeneration) -> tuple[torch.Tensor, ...]:
    """Every weight the decoder's first self-attention sublayer reads, the embedding included."""
    sa = model.decoder.block[0].layer[0]
    att = sa.SelfAttention
    return (model.decoder.embed_tokens.weight, sa.layer_norm.weight, att.q.weight, att.k.weight, att.v.weight,
            att.o.weight, att.relative_attention_bias.weight)


@torch.no_grad()
def _sublayer_rows(model: T5ForConditionalGeneration, seqs: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """seqs: (n, T) decoder inputs [start token, T - 1 code tokens] -> (n, d): the first
    self-attention sublayer (residual included, eval mode) at the last position."""
    dec = model.decoder
    sa = dec.block[0].layer[0]
    att = sa.SelfAttention
    t = seqs.shape[1] - 1
    bias = att.compute_bias(1, t + 1, device=seqs.device, past_seen_tokens=t).view(-1, t + 1).t()  # (T, H)
    out = []
    for part in seqs.split(chunk):
        e = dec.embed_tokens(part)  # (n, T, d)
        x = sa.layer_norm(e)
        n = part.shape[0]
        q = _linear(x[:, -1], att.q).view(n, 1, att.n_heads, -1)  # (n, 1, H, dk)
        k, v = (_linear(x, proj).view(n, t + 1, att.n_heads, -1) for proj in (att.k, att.v))  # (n, T, H, dk)
        weights = torch.softmax((q * k).sum(-1) + bias.to(e.dtype), dim=1).unsqueeze(-1)  # (n, T, H, 1)
        out.append(e[:, -1] + _linear((weights * v).sum(1).view(n, -1), att.o))
    return torch.cat(out)


@torch.no_grad()
def prefix_states(model: T5ForConditionalGeneration, trie: SidTrie, vocab: SidVocab,
                  chunk: int = 16384) -> list[torch.Tensor]:
    """The decoder's first self-attention sublayer (residual included, eval mode) at the last
    position of every trie prefix: per level l, (n_nodes_l, d), row = the trie node id, for the
    decoder input [start token, the prefix's l code tokens].

    That sublayer reads only the decoder's own tokens, so this is what `_decoder_step` computes
    for a beam at that node, whatever the history. Costs one pass over all trie prefixes.
    """
    device = model.decoder.embed_tokens.weight.device
    seqs = torch.full((1, 1), PAD, dtype=torch.long, device=device)  # level 0: the start token alone
    states = []
    for level in range(vocab.sid_len):
        states.append(_sublayer_rows(model, seqs, chunk))
        if level + 1 < vocab.sid_len:  # the prefixes one code longer, in child-id order
            table = trie.children[level].to(device)
            parent, code = (table >= 0).nonzero(as_tuple=True)
            child = table[parent, code].long()
            longer = torch.empty(int(child.max()) + 1, seqs.shape[1] + 1, dtype=torch.long, device=device)
            longer[child] = torch.cat([seqs[parent], (code + vocab.level_offset(level)).unsqueeze(1)], dim=1)
            seqs = longer
    return states


@torch.no_grad()
def grow_prefix_states(model: T5ForConditionalGeneration, trie: SidTrie, vocab: SidVocab,
                       old: list[torch.Tensor]) -> list[torch.Tensor]:
    """`prefix_states` of a trie grown by `SidTrie.add` from the parent `old` was built for:
    the parent's rows as they are, plus rows for the new nodes only, each from the first new
    item under it (new nodes only arise from new items). O(new items)."""
    device = old[0].device
    codes = trie.codes[trie.parent_items:].to(device)
    tokens = vocab.encode(codes)
    start = torch.full((codes.shape[0], 1), PAD, dtype=torch.long, device=device)
    nodes = torch.zeros(codes.shape[0], dtype=torch.long, device=device)
    states = [old[0]]
    for level in range(1, vocab.sid_len):
        nodes = trie.step(level - 1, nodes, codes[:, level - 1])
        first = trie.parent_nodes[level]
        ids, where = torch.unique(nodes, return_inverse=True)
        pick = torch.full((len(ids),), codes.shape[0], dtype=torch.long, device=device)
        pick = pick.scatter_reduce(0, where, torch.arange(codes.shape[0], device=device), reduce="amin")
        fresh = ids >= first
        ids, pick = ids[fresh], pick[fresh]
        if len(ids) != trie.num_nodes()[level] - first or (len(ids) and int(ids[-1]) != trie.num_nodes()[level] - 1):
            raise RuntimeError(f"grow_prefix_states: level {level}'s new nodes are not the new items' prefixes")
        if not len(ids):
            states.append(old[level])
            continue
        seqs = torch.cat([start[pick], tokens[pick, :level]], dim=1)
        states.append(append_rows(old[level], _sublayer_rows(model, seqs)))
    return states


@dataclass(eq=False)
class _PrefixEntry:
    trie: weakref.ref
    weights: tuple[torch.Tensor, ...]  # copies of `_first_layer_weights` when this entry was made
    states: list[torch.Tensor] | None = None


# model -> the trie and first-layer weights its last search saw, and their prefix states once built.
_PREFIX_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cached_prefix_states(model: T5ForConditionalGeneration, trie: SidTrie, vocab: SidVocab,
                          build_now: bool = False) -> list[torch.Tensor] | None:
    """`prefix_states` for this model and trie, built on the second search that finds the same
    trie and the same first-layer weights (or at once with `build_now`), kept until either
    changes; None before that.

    Waiting for the second call keeps a caller that changes the weights between searches (GRPO
    rollouts) from paying for states it uses once; evaluation, validation and serving decode
    many batches with the same weights. "The same weights" is compared by value against a copy
    (about 0.1 ms): version counters miss updates written through another view of the storage,
    as DeepSpeed's flattened parameter buffers are. None as well where the weights are not plain
    full tensors (ZeRO-3's partitioned placeholders) or the states would exceed
    PREFIX_STATES_MAX_BYTES.
    """
    weights = _first_layer_weights(model)
    if any(w.numel() == 0 for w in weights):
        return None
    if sum(int(c.shape[0]) for c in trie.children) * model.config.d_model * 4 > PREFIX_STATES_MAX_BYTES:
        return None
    entry = _PREFIX_CACHE.get(model)
    same_weights = entry is not None and all(map(torch.equal, entry.weights, weights))
    if (same_weights and entry.states is not None and trie.parent is not None
            and entry.trie() is trie.parent() and entry.trie() is not None):
        # The trie grew by `SidTrie.add` from the one these states are for: new rows only.
        grown = grow_prefix_states(model, trie, vocab, entry.states)
        entry = _PrefixEntry(weakref.ref(trie), entry.weights, grown)
        _PREFIX_CACHE[model] = entry
        return entry.states
    if entry is None or entry.trie() is not trie or not same_weights:
        entry = _PrefixEntry(weakref.ref(trie), tuple(w.detach().clone() for w in weights))
        _PREFIX_CACHE[model] = entry
        if not build_now:
            return None
    if entry.states is None:
        entry.states = prefix_states(model, trie, vocab)
    return entry.states


def prepare(model: SidRecommender, trie: SidTrie) -> bool:
    """Build the search's prefix states for this model and trie now, so that no search pays for
    them (tens of milliseconds for thousands of items): serving and evaluation call this once
    they hold the model and the trie, and again after adding items. False where the search
    does not use them (see `_cached_prefix_states`)."""
    return _cached_prefix_states(model.t5, trie, model.vocab, build_now=True) is not None


def _reorder(past: list[Cache], beam: torch.Tensor) -> list[Cache]:
    """The cache of the beams chosen in `beam` (B, W'): new beam j of history i continues old
    beam beam[i, j]. Positions shared by all beams of a history (W_p = 1) stay as they are."""
    b, w_new = beam.shape

    def pick(x: torch.Tensor) -> torch.Tensor:  # (B, W_p, H, dk) -> (B, W', H, dk)
        if x.shape[1] == 1:
            return x
        src = (torch.arange(b, device=x.device).unsqueeze(1) * x.shape[1] + beam).view(-1)
        return x.flatten(0, 1).index_select(0, src).view(b, w_new, *x.shape[2:])

    return [([pick(k) for k in pk], [pick(v) for v in pv]) for pk, pv in past]


def _check_inputs(
    model: T5ForConditionalGeneration,
    trie: SidTrie,
    vocab: SidVocab,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    beam_size: int,
    top_k: int,
    exclude: torch.Tensor | None,
) -> None:
    if trie.vocab != vocab:
        raise ValueError(f"trie was built for {trie.vocab}, decoding asked for {vocab}")
    if model.config.vocab_size != vocab.vocab_size:
        raise ValueError(f"model vocab_size {model.config.vocab_size} != SID vocab_size {vocab.vocab_size}")
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and attention_mask must both be (B, T); got {tuple(input_ids.shape)} "
            f"and {tuple(attention_mask.shape)}"
        )
    if beam_size < 1 or not 1 <= top_k <= beam_size:
        raise ValueError(f"need beam_size >= 1 and 1 <= top_k <= beam_size, got {beam_size=} {top_k=}")
    if exclude is not None and (exclude.dtype != torch.bool or exclude.shape != (input_ids.shape[0], trie.num_items)):
        raise ValueError(
            f"exclude must be (B={input_ids.shape[0]}, N_items={trie.num_items}) bool, "
            f"got {tuple(exclude.shape)} {exclude.dtype}"
        )


@torch.no_grad()
def beam_search(
    model: T5ForConditionalGeneration,
    trie: SidTrie,
    vocab: SidVocab,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    beam_size: int = 20,
    top_k: int = 10,
    exclude: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
) -> BeamOutput:
    """The `top_k` best valid SIDs per history by constrained beam search of width `beam_size`.

    input_ids, attention_mask: (B, T) from `encode_histories` (any padding side).
    inputs_embeds: optional (B, T, d) encoder input vectors used instead of embedding
    `input_ids` (which then only give the shape); see `seqmodel.HistoryEmbedder`.
    exclude: optional (B, N_items) bool; items never returned for that row (e.g. already
    seen). Applied at the last step by masking leaves, so excluded items do not use up beams
    there (they can still steer earlier steps, as their prefixes are shared with others).
    The model runs in eval mode for the call and is put back in its previous mode after.
    Differs from HF only when a row has fewer valid continuations than beams: HF then fills
    the list with copies scored about -1e9, this returns -1 / -inf.
    """
    _check_inputs(model, trie, vocab, input_ids, attention_mask, beam_size, top_k, exclude)
    device = model.lm_head.weight.device
    states = _cached_prefix_states(model, trie, vocab)
    if trie.children[0].device != device:
        trie = trie.to(device)  # callers that decode often should move the trie once
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    was_training = model.training
    model.eval()
    try:
        embeds = None if inputs_embeds is None else inputs_embeds.to(device)
        cross, cross_mask = _encoder_states(model, attention_mask, input_ids=input_ids, inputs_embeds=embeds)

        b = input_ids.shape[0]
        past: list[Cache] = [([], []) for _ in model.decoder.block]
        tokens = torch.full((b, 1), PAD, dtype=torch.long, device=device)  # T5's decoder start
        scores = torch.zeros(b, 1, device=device)  # (B, W): W = 1 until the first choice
        nodes = torch.zeros(b, 1, dtype=torch.long, device=device)  # trie node of each beam
        sids = torch.zeros(b, 1, 0, dtype=torch.long, device=device)  # codes chosen so far
        rows = torch.arange(b, device=device).unsqueeze(1)
        for level in range(vocab.sid_len):
            last = level == vocab.sid_len - 1
            first = None if states is None else states[level][nodes.view(-1).clamp(min=0)]  # dead beams: any row
            logits = _decoder_step(model, tokens, past, cross, cross_mask, first)
            w, size, offset = tokens.shape[1], vocab.level_size(level), vocab.level_offset(level)
            # Normalise over the full vocabulary first, then keep this level's token range:
            # the same numbers HF's constrained beam search adds up.
            logp = torch.log_softmax(logits.float(), dim=-1)[..., offset : offset + size]  # (B, W, size)
            allowed = trie.allowed(level, nodes.view(-1)).view(b, w, size)
            if last and exclude is not None:
                leaf = trie.children[level][nodes.clamp(min=0)].long()  # (B, W, size) item or -1
                seen = exclude.to(device).gather(1, leaf.clamp(min=0).view(b, -1)).view(b, w, size)
                allowed &= ~seen
            cand = (scores.unsqueeze(-1) + logp.masked_fill(~allowed, float("-inf"))).view(b, w * size)
            k = min(top_k if last else beam_size, w * size)
            scores, flat = cand.topk(k, dim=1)  # sorted, best first
            beam, code = flat // size, flat % size  # source beam and chosen code, (B, k)
            sids = torch.cat([sids[rows, beam], code.unsqueeze(-1)], dim=-1)
            nodes = trie.step(level, nodes[rows, beam].view(-1), code.view(-1)).view(b, k)
            nodes = nodes.masked_fill(torch.isinf(scores), -1)  # dead beams (masked picks) hold no prefix
            if not last:
                past = _reorder(past, beam)
                tokens = code + offset
    finally:
        model.train(was_training)

    dead = nodes < 0
    sids = sids.masked_fill(dead.unsqueeze(-1), -1)
    if k < top_k:  # fewer candidates than asked for: pad the lists
        pad = top_k - k
        nodes = F.pad(nodes, (0, pad), value=-1)
        scores = F.pad(scores, (0, pad), value=float("-inf"))
        sids = F.pad(sids, (0, 0, 0, pad), value=-1)
    return BeamOutput(items=nodes, scores=scores, sids=sids)


@torch.no_grad()
def recommend(
    model: SidRecommender,
    trie: SidTrie,
    histories: list[list[int]],
    max_history: int,
    beam_size: int = 20,
    top_k: int = 10,
    exclude: torch.Tensor | None = None,
) -> BeamOutput:
    """`beam_search` from B item_idx histories (oldest first): the last `max_history` items
    are laid out as the model's encoder reads them. exclude: optional (B, N_items) bool."""
    device = model.t5.lm_head.weight.device
    input_ids, mask = (t.to(device) for t in model.batch(histories, max_history))
    embeds = model.encoder_kwargs(input_ids, mask).get("inputs_embeds")
    return beam_search(model.t5, trie, model.vocab, input_ids, mask, beam_size=beam_size, top_k=top_k,
                       exclude=exclude, inputs_embeds=embeds)


@dataclass(frozen=True, eq=False)
class SampleOutput:
    """G sampled SIDs per history. items: (B, G) int64 item index; sids: (B, G, sid_len) codes."""

    items: torch.Tensor
    sids: torch.Tensor


@torch.no_grad()
def sample(
    model: SidRecommender,
    trie: SidTrie,
    histories: list[list[int]],
    max_history: int,
    num_samples: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> SampleOutput:
    """`num_samples` SIDs per history by ancestral sampling under the trie (GRPO rollouts).

    At each level the next code is drawn from softmax(logits / temperature) restricted to that
    level's codes the trie allows after the prefix so far, the same masked distribution
    `constrained_logprobs` scores; so every sample is a valid SID (an item). Samples of one
    history are independent and may repeat. Runs in eval mode (no dropout).
    """
    if num_samples < 1 or not temperature > 0:
        raise ValueError(f"need num_samples >= 1 and temperature > 0, got {num_samples}, {temperature}")
    t5, vocab = model.t5, model.vocab
    device = t5.lm_head.weight.device
    if trie.children[0].device != device:
        trie = trie.to(device)
    input_ids, mask = (t.to(device) for t in model.batch(histories, max_history))
    was_training = model.training
    model.eval()
    try:
        cross, cross_mask = _encoder_states(t5, mask, **model.encoder_kwargs(input_ids, mask))
        b, g = len(histories), num_samples
        past: list[Cache] = [([], []) for _ in t5.decoder.block]
        tokens = torch.full((b, 1), PAD, dtype=torch.long, device=device)
        nodes = torch.zeros(b * g, dtype=torch.long, device=device)
        codes = []
        for level in range(vocab.sid_len):
            logits = _decoder_step(t5, tokens, past, cross, cross_mask)  # (B, W, V)
            if level == 0:  # all samples share the first step (its cache stays shared); fan out to G
                logits = logits.expand(b, g, -1)
            offset, size = vocab.level_offset(level), vocab.level_size(level)
            lv = logits[..., offset:offset + size].reshape(b * g, size).float() / temperature
            lv = lv.masked_fill(~trie.allowed(level, nodes), float("-inf"))
            code = torch.multinomial(torch.softmax(lv, dim=-1), 1, generator=generator).squeeze(-1)  # (B*G,)
            codes.append(code)
            nodes = trie.step(level, nodes, code)
            tokens = (code + offset).view(b, g)
    finally:
        model.train(was_training)
    return SampleOutput(items=nodes.view(b, g), sids=torch.stack(codes, dim=-1).view(b, g, vocab.sid_len))


def _teacher_forced_logits(model: SidRecommender, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           tokens: torch.Tensor) -> torch.Tensor:
    """Decoder logits (B*G, L, V) for G token sequences (B, G, L) per history, fed shifted right
    from PAD; the encoder runs once per history and its output is shared by the G sequences."""
    t5 = model.t5
    b, g, length = tokens.shape
    enc = t5.encoder(**model.encoder_kwargs(input_ids, attention_mask), attention_mask=attention_mask)
    hidden = enc.last_hidden_state.repeat_interleave(g, dim=0)  # (B*G, S, d)
    flat = tokens.reshape(b * g, length)
    decoder_in = torch.cat([torch.full_like(flat[:, :1], PAD), flat[:, :-1]], dim=1)
    return t5(encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
              attention_mask=attention_mask.repeat_interleave(g, dim=0), decoder_input_ids=decoder_in).logits


def constrained_logprobs(
    model: SidRecommender,
    trie: SidTrie,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    sids: torch.Tensor,
) -> torch.Tensor:
    """Teacher-forced log-probs of given SIDs under the trie-masked, per-level softmax that
    `sample` draws from (temperature 1), with gradients.

    input_ids, attention_mask: (B, T) from `model.batch`; sids: (B, G, sid_len) codes of valid
    SIDs. The encoder runs once per history; its output is shared by the G sequences.
    Returns (B, G, sid_len) float32: log p(code_l | history, codes_<l).
    """
    vocab = model.vocab
    b, g, length = sids.shape
    flat = sids.reshape(b * g, length)
    logits = _teacher_forced_logits(model, input_ids, attention_mask, vocab.encode(sids))  # (B*G, L, V)
    out = []
    nodes = torch.zeros(b * g, dtype=torch.long, device=sids.device)
    for level in range(length):
        offset, size = vocab.level_offset(level), vocab.level_size(level)
        lv = logits[:, level, offset:offset + size].float().masked_fill(~trie.allowed(level, nodes), float("-inf"))
        out.append(torch.log_softmax(lv, dim=-1).gather(1, flat[:, level:level + 1]).squeeze(1))
        nodes = trie.step(level, nodes, flat[:, level])
    if bool((nodes < 0).any()):
        raise ValueError("constrained_logprobs: some sids are not valid SIDs of this trie")
    return torch.stack(out, dim=-1).view(b, g, length)


def sid_logprobs(model: SidRecommender, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 items: torch.Tensor) -> torch.Tensor:
    """Teacher-forced log p(SID of item | history) over the full vocabulary, the score
    `beam_search` gives a finished beam. input_ids, attention_mask: (B, T) from `model.batch`;
    items: (B, C) item_idx (-1 allowed: scored as item 0, mask it yourself). Returns (B, C) float32."""
    b, c = items.shape
    tokens = model.sid_tokens[items.clamp(min=0)]  # (B, C, sid_len)
    logits = _teacher_forced_logits(model, input_ids, attention_mask, tokens)  # (B*C, sid_len, V)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(2, tokens.view(b * c, -1, 1)).squeeze(-1)
    return logp.sum(dim=1).view(b, c)


@torch.no_grad()
def hybrid_recommend(
    model: SidRecommender,
    trie: SidTrie,
    histories: list[list[int]],
    max_history: int,
    dense_weight: float,
    beam_size: int = 20,
    top_k: int = 10,
    exclude: torch.Tensor | None = None,
) -> BeamOutput:
    """Generative + dense retrieval, re-ranked (LIGER, Yang et al. 2024, without its cold-start set).

    Candidates: the `beam_size` best SIDs of the constrained beam search and the `beam_size`
    best items of the dense head (`SidRecommender.dense_logits`), both without excluded items.
    Each is scored (1 - dense_weight) * log p_gen(SID | history) + dense_weight * log p_dense(item
    | history) (teacher-forced generative log-prob, so items found only by the dense head get
    their exact generative score) and the best `top_k` distinct items are returned.
    dense_weight 0 ranks by the generative score alone over the union; exclude: (B, N_items) bool.
    Returns BeamOutput with scores = the fused score and sids = the items' codes.
    """
    if not 0 <= dense_weight <= 1:
        raise ValueError(f"dense_weight must be in [0, 1], got {dense_weight}")
    device = model.t5.lm_head.weight.device
    gen = recommend(model, trie, histories, max_history, beam_size=beam_size, top_k=beam_size, exclude=exclude)
    input_ids, mask = (t.to(device) for t in model.batch(histories, max_history))
    was_training = model.training
    model.eval()
    try:
        dense = torch.log_softmax(model.dense_logits(model.dense_query(input_ids, mask)).float(), dim=-1)  # (B, N)
        if exclude is not None:
            dense = dense.masked_fill(exclude.to(device), float("-inf"))
        found = dense.topk(min(beam_size, dense.shape[1]), dim=1)
        cand = torch.cat([gen.items, found.indices.masked_fill(torch.isinf(found.values), -1)], dim=1)  # (B, C)
        # Keep each item's first occurrence in the row (the beam's, when both found it).
        b, c = cand.shape
        pos = torch.arange(c, device=device).expand(b, c)
        first = torch.full((b, model.n_items + 1), c, dtype=torch.long, device=device)
        first = first.scatter_reduce(1, cand + 1, pos, reduce="amin")  # column 0 collects the -1s
        keep = (cand >= 0) & (first.gather(1, cand + 1) == pos)
        fused = (1 - dense_weight) * sid_logprobs(model, input_ids, mask, cand) \
            + dense_weight * dense.gather(1, cand.clamp(min=0))
        fused = fused.masked_fill(~keep, float("-inf"))
    finally:
        model.train(was_training)
    scores, order = fused.topk(top_k, dim=1)
    items = cand.gather(1, order).masked_fill(torch.isinf(scores), -1)
    sids = model.vocab.decode(model.sid_tokens[items.clamp(min=0)]).masked_fill((items < 0).unsqueeze(-1), -1)
    return BeamOutput(items=items, scores=scores, sids=sids)
