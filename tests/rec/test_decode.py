"""beam_search against exhaustive scoring and against Hugging Face's constrained beam search.

The model is a tiny random T5 (2+2 layers, d_model 16). Its lm_head has std 1, so logits
have std ~4 and the scores of different SIDs are far apart (checked below), which makes
"the same top-K" a sharp test rather than a tie-breaking lottery.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import T5ForConditionalGeneration

from digr.rec import decode
from digr.rec.decode import _encode, _linear, beam_search
from digr.rec.seqmodel import PAD, ModelConfig, SidRecommender, SidVocab, build_t5, encode_histories
from digr.rec.trie import SidTrie

VOCAB = SidVocab(levels=3, codebook_size=4, suffix_size=2)
# 12 items; items 0/1 and 6/7 collide on the 3-tuple and differ in the suffix.
CODES = torch.tensor(
    [
        [0, 1, 2, 0], [0, 1, 2, 1], [0, 3, 0, 0], [2, 0, 1, 0], [2, 0, 3, 0], [1, 1, 1, 0],
        [3, 2, 1, 0], [3, 2, 1, 1], [3, 0, 0, 0], [1, 2, 3, 0], [0, 1, 0, 0], [2, 3, 3, 0],
    ]
)  # fmt: skip
HISTORIES = [[0, 5, 3], [7], [2, 9, 11, 4, 4]]  # different lengths: padding must not leak


@pytest.fixture(scope="module")
def model() -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2, dropout=0.1)
    return build_t5(VOCAB, cfg).eval()


@pytest.fixture(scope="module")
def trie() -> SidTrie:
    return SidTrie.from_codes(CODES, VOCAB)


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return encode_histories(HISTORIES, VOCAB.encode(CODES), max_items=10)


@torch.no_grad()
def brute_force(model: T5ForConditionalGeneration, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, N_items) summed log-prob of every item's SID, by teacher forcing each one."""
    tokens = VOCAB.encode(CODES)  # (N, L)
    n = tokens.shape[0]
    dec_in = torch.cat([torch.full((n, 1), PAD), tokens[:, :-1]], dim=1)  # shift right
    out = []
    for row in range(ids.shape[0]):
        logits = model(input_ids=ids[row].expand(n, -1), attention_mask=mask[row].expand(n, -1),
                       decoder_input_ids=dec_in).logits  # fmt: skip
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        out.append(logp.sum(-1))
    return torch.stack(out)


def test_exhaustive_beam_equals_brute_force(model, trie, inputs) -> None:
    ids, mask = inputs
    exact = brute_force(model, ids, mask)
    want_scores, want_items = exact.sort(dim=1, descending=True)
    # Precondition for an exact comparison: no near-ties among the top 6 + 1 of any row.
    assert (want_scores[:, :6] - want_scores[:, 1:7]).min() > 1e-3
    # Beam 12 >= the number of valid prefixes at every level, so nothing is pruned.
    got = beam_search(model, trie, VOCAB, ids, mask, beam_size=12, top_k=6)
    assert got.items.tolist() == want_items[:, :6].tolist()
    torch.testing.assert_close(got.scores, want_scores[:, :6], atol=1e-4, rtol=0)
    assert torch.equal(got.sids, CODES[got.items])


def test_matches_hf_constrained_generate_with_pruning(model, trie, inputs) -> None:
    """Beam 3 prunes: the result must be HF's, which here differs from the exhaustive top 2."""
    ids, mask = inputs
    tokens = VOCAB.encode(CODES).tolist()
    allowed: dict[tuple[int, ...], set[int]] = {}
    for sid in tokens:
        for level in range(VOCAB.sid_len):
            allowed.setdefault(tuple(sid[:level]), set()).add(sid[level])

    def prefix_fn(_batch_id: int, sent: torch.Tensor) -> list[int]:
        return sorted(allowed[tuple(sent[1:].tolist())])

    hf = model.generate(input_ids=ids, attention_mask=mask, num_beams=3, num_return_sequences=2,
                        prefix_allowed_tokens_fn=prefix_fn, max_new_tokens=VOCAB.sid_len, do_sample=False,
                        length_penalty=0.0, return_dict_in_generate=True, output_scores=True)  # fmt: skip
    hf_sids = VOCAB.decode(hf.sequences[:, 1:]).view(len(HISTORIES), 2, VOCAB.sid_len)
    got = beam_search(model, trie, VOCAB, ids, mask, beam_size=3, top_k=2)
    assert got.sids.tolist() == hf_sids.tolist()
    # length_penalty=0: HF's sequence score is the plain sum of log-probs, like ours.
    torch.testing.assert_close(got.scores, hf.sequences_scores.view(-1, 2), atol=1e-4, rtol=0)
    exhaustive = brute_force(model, ids, mask).topk(2, dim=1).indices
    assert not torch.equal(got.items, exhaustive), "beam 3 should prune something here, or the test is weak"


def test_exclude_masks_items(model, trie, inputs) -> None:
    ids, mask = inputs
    exact = brute_force(model, ids, mask)
    exclude = torch.zeros(len(HISTORIES), len(CODES), dtype=torch.bool)
    exclude[0, exact[0].argmax()] = True  # row 0 loses its best item
    exclude[1, [0, 1, 6, 7]] = True  # row 1 loses both members of each collision pair
    got = beam_search(model, trie, VOCAB, ids, mask, beam_size=12, top_k=5, exclude=exclude)
    want = exact.masked_fill(exclude, float("-inf")).topk(5, dim=1)
    assert got.items.tolist() == want.indices.tolist()
    torch.testing.assert_close(got.scores, want.values, atol=1e-4, rtol=0)
    assert not exclude.gather(1, got.items).any()


def test_fewer_valid_items_than_k_pads_with_minus_one(model) -> None:
    codes = CODES[:3]  # three items: (0,1,2,0), (0,1,2,1), (0,3,0,0)
    trie = SidTrie.from_codes(codes, VOCAB)
    ids, mask = encode_histories([[0, 2]], VOCAB.encode(codes), max_items=10)
    got = beam_search(model, trie, VOCAB, ids, mask, beam_size=8, top_k=5)
    assert sorted(got.items[0, :3].tolist()) == [0, 1, 2]
    assert got.items[0, 3:].tolist() == [-1, -1]
    assert torch.isfinite(got.scores[0, :3]).all() and torch.isneginf(got.scores[0, 3:]).all()
    assert (got.sids[0, 3:] == -1).all()
    assert torch.equal(got.sids[0, :3], codes[got.items[0, :3]])


def test_rows_are_independent_of_batch_and_padding(model, trie, inputs) -> None:
    ids, mask = inputs  # row 1 (1 item) is padded to the width of row 2 (5 items)
    batched = beam_search(model, trie, VOCAB, ids, mask, beam_size=4, top_k=3)
    for row, hist in enumerate(HISTORIES):
        ids1, mask1 = encode_histories([hist], VOCAB.encode(CODES), max_items=10)  # no padding
        alone = beam_search(model, trie, VOCAB, ids1, mask1, beam_size=4, top_k=3)
        assert alone.items[0].tolist() == batched.items[row].tolist(), f"row {row}"
        torch.testing.assert_close(alone.scores[0], batched.scores[row], atol=1e-5, rtol=0)


def test_runs_in_eval_mode_and_restores_training(model, trie, inputs) -> None:
    ids, mask = inputs
    decode._cached_prefix_states(model, trie, VOCAB, build_now=True)  # both calls take the same path
    want = beam_search(model, trie, VOCAB, ids, mask, beam_size=4, top_k=3)
    model.train()  # dropout 0.1 would perturb the scores if it were left on
    try:
        got = beam_search(model, trie, VOCAB, ids, mask, beam_size=4, top_k=3)
        assert model.training
    finally:
        model.eval()
    assert torch.equal(got.items, want.items) and torch.equal(got.scores, want.scores)


def test_bad_arguments_raise(model, trie, inputs) -> None:
    ids, mask = inputs
    with pytest.raises(ValueError, match="top_k"):
        beam_search(model, trie, VOCAB, ids, mask, beam_size=2, top_k=3)
    with pytest.raises(ValueError, match="exclude must be"):
        beam_search(model, trie, VOCAB, ids, mask, exclude=torch.zeros(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="trie was built for"):
        beam_search(model, trie, SidVocab(3, 4, 3), ids, mask)
    with pytest.raises(ValueError, match="attention_mask"):
        beam_search(model, trie, VOCAB, ids, mask[:, :-1])


def test_linear_matches_torch_on_both_paths(model, monkeypatch) -> None:
    """`_linear` (oneDNN on CPU where PyTorch has it, else F.linear) is the layer, then ReLU."""
    ff = model.decoder.block[0].layer[2].DenseReluDense
    x = torch.randn(3, 5, model.config.d_model)
    for onednn in (decode._ONEDNN_LINEAR, None):
        monkeypatch.setattr(decode, "_ONEDNN_LINEAR", onednn)
        torch.testing.assert_close(_linear(x, ff.wi), ff.wi(x), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(_linear(x, ff.wi, relu=True), F.relu(ff.wi(x)), atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_encoder_matches_hf_with_padding(model, inputs) -> None:
    ids, mask = inputs  # rows of 3, 1 and 5 items padded to 5
    want = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(_encode(model, mask, input_ids=ids), want, atol=1e-5, rtol=1e-5)
    embeds = model.encoder.embed_tokens(ids)
    torch.testing.assert_close(_encode(model, mask, inputs_embeds=embeds), want, atol=1e-5, rtol=1e-5)


def test_beam_search_same_without_onednn(model, trie, inputs, monkeypatch) -> None:
    ids, mask = inputs
    fast = beam_search(model, trie, VOCAB, ids, mask, beam_size=5, top_k=4)
    monkeypatch.setattr(decode, "_ONEDNN_LINEAR", None)
    plain = beam_search(model, trie, VOCAB, ids, mask, beam_size=5, top_k=4)
    assert torch.equal(fast.items, plain.items)
    torch.testing.assert_close(fast.scores, plain.scores, atol=1e-5, rtol=0)


@torch.no_grad()
def test_prefix_states_match_hf_first_layer(model, trie) -> None:
    """Row `node` of states[l] is HF's first decoder self-attention sublayer output at the last
    position of [start, that node's l code tokens], whatever the encoder input."""
    states = decode.prefix_states(model, trie, VOCAB)
    assert [s.shape for s in states] == [(c.shape[0], model.config.d_model) for c in trie.children]
    captured = []
    hook = model.decoder.block[0].layer[0].register_forward_hook(lambda _m, _i, out: captured.append(out[0]))
    try:
        tokens = VOCAB.encode(CODES)
        dec_in = torch.cat([torch.full((len(CODES), 1), PAD), tokens[:, :-1]], dim=1)
        ids = torch.randint(1, VOCAB.vocab_size, (len(CODES), 4))  # any history: the layer must not see it
        model(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec_in)
    finally:
        hook.remove()
    hf = captured[0]  # (N_items, sid_len, d)
    nodes = torch.zeros(len(CODES), dtype=torch.long)
    for level in range(VOCAB.sid_len):
        torch.testing.assert_close(states[level][nodes], hf[:, level], atol=1e-5, rtol=1e-5)
        if level + 1 < VOCAB.sid_len:
            nodes = trie.step(level, nodes, CODES[:, level])


def test_search_builds_prefix_states_on_the_second_call_and_drops_them_on_change(trie, inputs) -> None:
    torch.manual_seed(1)
    cfg = ModelConfig(d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2)
    model = build_t5(VOCAB, cfg).eval()
    ids, mask = inputs
    exact = brute_force(model, ids, mask).topk(6, dim=1)
    for call in range(2):  # the first computes the layer, the second builds the states and uses them
        got = beam_search(model, trie, VOCAB, ids, mask, beam_size=12, top_k=6)
        assert (decode._PREFIX_CACHE[model].states is not None) == (call == 1)
        assert got.items.tolist() == exact.indices.tolist()
        torch.testing.assert_close(got.scores, exact.values, atol=1e-4, rtol=0)

    with torch.no_grad():  # an in-place update (as an optimizer step does) must not reuse old states
        model.decoder.block[0].layer[0].SelfAttention.v.weight.mul_(-3.0)
    changed = brute_force(model, ids, mask).topk(6, dim=1)
    assert changed.indices.tolist() != exact.indices.tolist(), "the change should move the ranking"
    for call in range(2):
        got = beam_search(model, trie, VOCAB, ids, mask, beam_size=12, top_k=6)
        assert (decode._PREFIX_CACHE[model].states is not None) == (call == 1)
        assert got.items.tolist() == changed.indices.tolist()
        torch.testing.assert_close(got.scores, changed.values, atol=1e-4, rtol=0)

    # DeepSpeed keeps parameters as views of one flat buffer and writes the buffer: the
    # parameter's own version counter does not move, its values do.
    weight = model.decoder.block[0].layer[0].SelfAttention.q.weight
    flat = weight.detach().clone().view(-1)
    weight.data = flat.view_as(weight)
    for call in range(3):
        beam_search(model, trie, VOCAB, ids, mask, beam_size=12, top_k=6)
        if call == 1:
            assert decode._PREFIX_CACHE[model].states is not None
            with torch.no_grad():
                flat.mul_(-2.0)
    assert decode._PREFIX_CACHE[model].states is None, "states built for the old values were kept"
    got = beam_search(model, trie, VOCAB, ids, mask, beam_size=12, top_k=6)
    want = brute_force(model, ids, mask).topk(6, dim=1)
    assert got.items.tolist() == want.indices.tolist()

    other = SidTrie.from_codes(CODES, VOCAB)  # the same codes, another trie object (e.g. after `add`)
    beam_search(model, trie, VOCAB, ids, mask, beam_size=12, top_k=6)
    beam_search(model, other, VOCAB, ids, mask, beam_size=12, top_k=6)
    assert decode._PREFIX_CACHE[model].states is None


def test_prepare_builds_the_states_at_once_and_recommend_uses_them(trie) -> None:
    torch.manual_seed(2)
    cfg = ModelConfig(d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2,
                      content_features=False)
    rec = SidRecommender(VOCAB, cfg, VOCAB.encode(CODES)).eval()
    first = decode.recommend(rec, trie, HISTORIES, max_history=10, beam_size=12, top_k=6)  # without states
    assert decode.prepare(rec, trie)
    states = decode._PREFIX_CACHE[rec.t5].states
    assert states is not None
    got = decode.recommend(rec, trie, HISTORIES, max_history=10, beam_size=12, top_k=6)
    assert decode._PREFIX_CACHE[rec.t5].states is states  # used, not rebuilt
    assert got.items.tolist() == first.items.tolist()
    torch.testing.assert_close(got.scores, first.scores, atol=1e-5, rtol=0)


@torch.no_grad()
def test_an_added_trie_grows_its_prefix_states_by_the_new_rows_only(model, trie, monkeypatch) -> None:
    decode._cached_prefix_states(model, trie, VOCAB, build_now=True)
    new = torch.tensor([[3, 3, 3, 1], [1, 3, 0, 0], [2, 0, 1, 1]])  # a new suffix, a new branch, a new suffix
    grown = trie.add(new)
    full = decode.prefix_states(model, grown, VOCAB)

    def rebuild(*_a, **_k):
        raise AssertionError("a grown trie must not rebuild every prefix state")

    monkeypatch.setattr(decode, "prefix_states", rebuild)
    states = decode._cached_prefix_states(model, grown, VOCAB)
    assert [s.shape[0] for s in states] == list(grown.num_nodes())
    for got, want in zip(states, full):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert decode._PREFIX_CACHE[model].trie() is grown
