"""SidRecommender: the "items" encoder layout by hand, and decoding it exactly (brute force, HF)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from digr.rec.decode import beam_search, hybrid_recommend, recommend, sid_logprobs
from digr.rec.seqmodel import PAD, ModelConfig, SidRecommender, SidVocab, item_histories, recency_index
from digr.rec.trie import SidTrie

VOCAB = SidVocab(levels=2, codebook_size=3, suffix_size=2)
# 5 items; items 0 and 4 share (0, 1) and differ in the suffix. Token offsets: level 0 -> 2,
# level 1 -> 5, suffix -> 8. Item 1 (2, 0, 0) -> tokens (4, 5, 8).
CODES = torch.tensor([[0, 1, 0], [2, 0, 0], [1, 2, 0], [1, 1, 0], [0, 1, 1]])
HISTORIES = [[1, 3], [4], [2, 0, 1, 3]]
TINY = ModelConfig(d_model=8, d_kv=4, d_ff=16, num_layers=1, num_decoder_layers=1, num_heads=2, dropout=0.0)


def test_item_histories_by_hand() -> None:
    items, mask = item_histories([[5, 6, 7], [2], []], max_items=2)
    assert items.tolist() == [[6, 7], [2, 0], [0, 0]]  # last 2 kept; right-padded with 0
    assert mask.tolist() == [[1, 1], [1, 0], [0, 0]]
    empty, empty_mask = item_histories([[]], max_items=5)
    assert empty.shape == (1, 1) and empty_mask.tolist() == [[0]]  # one masked position


def test_items_layout_sums_code_item_and_content_embeddings() -> None:
    # d_model 8 but set every table by hand: shared[t] = t (all dims), item[i] = 100 * i,
    # content = the first feature times 1000. Item 1: tokens 4 + 5 + 8 = 17, + 100, + 1000 * 0.5.
    features = torch.tensor([[0.0, 9.0], [0.5, 9.0], [0.0, 9.0], [0.0, 9.0], [0.0, 9.0]])
    model = SidRecommender(VOCAB, TINY, VOCAB.encode(CODES), features)
    with torch.no_grad():
        model.t5.shared.weight.copy_(torch.arange(VOCAB.vocab_size, dtype=torch.float).unsqueeze(1).expand(-1, 8))
        model.item.weight.copy_(100 * torch.arange(5, dtype=torch.float).unsqueeze(1).expand(-1, 8))
        model.content.weight.copy_(torch.tensor([[1000.0, 0.0]] * 8))
    ids, mask = model.batch([[1], [3, 1]], max_items=5)
    assert ids.tolist() == [[1, 0], [3, 1]] and mask.tolist() == [[1, 0], [1, 1]]
    x = model.encoder_kwargs(ids, mask)["inputs_embeds"]
    # Item 3 (1, 1, 0) -> tokens 3 + 6 + 8 = 17, + 300, + 0. Padding is zeroed.
    assert x[:, :, 0].tolist() == [[617.0, 0.0], [317.0, 617.0]]


def test_recency_index_by_hand_on_both_padding_sides() -> None:
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 0, 0]])
    assert recency_index(mask, 10).tolist() == [[2, 1, 0, 0], [0, 2, 1, 0], [0, 0, 0, 0]]
    assert recency_index(mask, 2).tolist() == [[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]]  # older ones share the last row


def test_recency_embedding_marks_the_latest_item() -> None:
    # Everything zero except recency[r] = 10 ** r: item vectors are then pure recency.
    cfg = dataclasses.replace(TINY, recency_positions=2, content_features=False)
    model = SidRecommender(VOCAB, cfg, VOCAB.encode(CODES))
    with torch.no_grad():
        model.t5.shared.weight.zero_()
        model.item.weight.zero_()
        model.recency.weight.copy_(torch.tensor([[1.0] * 8, [10.0] * 8]))
    ids, mask = model.batch([[1], [3, 1, 2]], max_items=5)
    x = model.encoder_kwargs(ids, mask)["inputs_embeds"][:, :, 0]
    assert x.tolist() == [[1.0, 0.0, 0.0], [10.0, 10.0, 1.0]]  # latest -> row 0; padding stays zero
    with pytest.raises(ValueError, match="recency_positions"):
        ModelConfig(recency_positions=-1)


def test_content_features_need_features() -> None:
    with pytest.raises(ValueError, match="content_features needs features"):
        SidRecommender(VOCAB, TINY, VOCAB.encode(CODES), None)
    with pytest.raises(ValueError, match="encoder_input"):
        ModelConfig(encoder_input="pixels")


@pytest.fixture(scope="module")
def model() -> SidRecommender:
    torch.manual_seed(0)
    features = torch.randn(len(CODES), 6)
    m = SidRecommender(VOCAB, TINY, VOCAB.encode(CODES), features).eval()
    with torch.no_grad():  # peaked logits, so near-ties cannot reorder the comparisons
        m.t5.lm_head.weight.mul_(4)
    return m


@torch.no_grad()
def brute_force(model: SidRecommender, histories: list[list[int]]) -> torch.Tensor:
    """(B, N_items) summed log-prob of every item's SID, by teacher forcing each one."""
    tokens = VOCAB.encode(CODES)
    dec_in = torch.cat([torch.full((len(CODES), 1), PAD), tokens[:, :-1]], dim=1)
    out = []
    for h in histories:
        ids, mask = model.batch([h], max_items=10)
        emb = model.encoder_kwargs(ids, mask)["inputs_embeds"]
        n = len(CODES)
        logits = model.t5(inputs_embeds=emb.expand(n, -1, -1), attention_mask=mask.expand(n, -1),
                          decoder_input_ids=dec_in).logits
        out.append(torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1).sum(-1))
    return torch.stack(out)


def test_recommend_equals_brute_force(model) -> None:
    trie = SidTrie.from_codes(CODES, VOCAB)
    want_scores, want_items = brute_force(model, HISTORIES).sort(dim=1, descending=True)
    assert (want_scores[:, :4] - want_scores[:, 1:5]).min() > 1e-3
    got = recommend(model, trie, HISTORIES, max_history=10, beam_size=5, top_k=4)  # nothing pruned
    assert got.items.tolist() == want_items[:, :4].tolist()
    torch.testing.assert_close(got.scores, want_scores[:, :4], atol=1e-4, rtol=0)


def test_recommend_matches_hf_generate_on_inputs_embeds(model) -> None:
    trie = SidTrie.from_codes(CODES, VOCAB)
    allowed: dict[tuple[int, ...], set[int]] = {}
    for sid in VOCAB.encode(CODES).tolist():
        for level in range(VOCAB.sid_len):
            allowed.setdefault(tuple(sid[:level]), set()).add(sid[level])
    ids, mask = model.batch(HISTORIES, max_items=10)
    emb = model.encoder_kwargs(ids, mask)["inputs_embeds"]
    hf = model.t5.generate(inputs_embeds=emb, attention_mask=mask, num_beams=2, num_return_sequences=2,
                           prefix_allowed_tokens_fn=lambda _b, s: sorted(allowed[tuple(s[1:].tolist())]),
                           max_new_tokens=VOCAB.sid_len, do_sample=False, length_penalty=0.0,
                           return_dict_in_generate=True, output_scores=True)
    got = recommend(model, trie, HISTORIES, max_history=10, beam_size=2, top_k=2)
    hf_sids = VOCAB.decode(hf.sequences[:, -VOCAB.sid_len:]).view(len(HISTORIES), 2, VOCAB.sid_len)
    assert got.sids.tolist() == hf_sids.tolist()
    torch.testing.assert_close(got.scores, hf.sequences_scores.view(-1, 2), atol=1e-4, rtol=0)
    # And through beam_search directly with the same inputs_embeds.
    direct = beam_search(model.t5, trie, VOCAB, ids, mask, beam_size=2, top_k=2, inputs_embeds=emb)
    assert torch.equal(direct.items, got.items)


def test_forward_loss_is_hf_loss_plus_the_dense_term_by_hand(model) -> None:
    ids, mask = model.batch(HISTORIES, max_items=10)
    targets = torch.tensor([2, 0, 4])
    labels = model.sid_tokens[targets]
    emb = model.encoder_kwargs(ids, mask)["inputs_embeds"]
    hf = model.t5(inputs_embeds=emb, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(model(ids, mask, labels), hf)
    # Dense head by hand: the start-position query against every item as the encoder reads it.
    query = model.dense_query(ids, mask)  # (B, d)
    items = model.encoder_kwargs(torch.arange(len(CODES))[None], torch.ones(1, len(CODES), dtype=torch.long))
    logits = query @ items["inputs_embeds"][0].T / TINY.d_model**0.5  # (B, N_items)
    dense = torch.nn.functional.cross_entropy(logits, targets)
    torch.testing.assert_close(model(ids, mask, labels, targets=targets, dense_weight=0.5), hf + 0.5 * dense)
    with pytest.raises(ValueError, match="needs targets"):
        model(ids, mask, labels, dense_weight=0.5)


def test_sid_logprobs_are_the_beam_scores(model) -> None:
    trie = SidTrie.from_codes(CODES, VOCAB)
    got = recommend(model, trie, HISTORIES, max_history=10, beam_size=5, top_k=4)
    ids, mask = model.batch(HISTORIES, max_items=10)
    torch.testing.assert_close(sid_logprobs(model, ids, mask, got.items), got.scores, atol=1e-4, rtol=0)


@torch.no_grad()
def test_hybrid_equals_brute_force_fusion_and_excludes(model) -> None:
    """Beam 5 = the whole catalogue, so the candidates are every item and the hybrid's ranking
    must be the fused score's exhaustive sort; seen items never come back."""
    trie = SidTrie.from_codes(CODES, VOCAB)
    ids, mask = model.batch(HISTORIES, max_items=10)
    gen = brute_force(model, HISTORIES)  # (B, N)
    dense = torch.log_softmax(model.dense_logits(model.dense_query(ids, mask)), dim=-1)
    exclude = torch.zeros(len(HISTORIES), len(CODES), dtype=torch.bool)
    exclude[0, 3] = exclude[2, [0, 1]] = True
    for weight in (0.0, 0.3, 1.0):
        fused = ((1 - weight) * gen + weight * dense).masked_fill(exclude, float("-inf"))
        want_scores, want_items = fused.sort(dim=1, descending=True)
        got = hybrid_recommend(model, trie, HISTORIES, 10, weight, beam_size=5, top_k=3, exclude=exclude)
        assert got.items.tolist() == want_items[:, :3].tolist(), weight
        torch.testing.assert_close(got.scores, want_scores[:, :3], atol=1e-4, rtol=0)
        assert torch.equal(got.sids, CODES[got.items])
    # Fewer allowed items than top_k: -1 padding, never an excluded or repeated item.
    exclude[2] = True
    exclude[2, 4] = False
    got = hybrid_recommend(model, trie, HISTORIES, 10, 0.5, beam_size=5, top_k=3, exclude=exclude)
    assert got.items[2].tolist() == [4, -1, -1]
    assert got.sids[2, 1].tolist() == [-1] * VOCAB.sid_len
    for row in got.items.tolist():
        kept = [i for i in row if i >= 0]
        assert len(kept) == len(set(kept))
    with pytest.raises(ValueError, match="dense_weight"):
        hybrid_recommend(model, trie, HISTORIES, 10, 1.5)
