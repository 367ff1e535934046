"""Constrained beam search: `digr.rec.decode.beam_search` against Hugging Face `generate`.

    .venv/bin/python benchmarks/bench_decode.py                     # TIGER-sized random T5, one position per item
    .venv/bin/python benchmarks/bench_decode.py --encoder-input sid_tokens   # TIGER's flattened SID-token input
    .venv/bin/python benchmarks/bench_decode.py --model-dir RUN/sft/model --trie RUN/tokenize/trie.npz  # a trained one

Decodes the same histories both ways (beam 20, top 10), prints how many rows have identical
top-10 item lists, the median time of each, the speed-up, and where our time goes.
The two are timed in interleaved pairs (the order alternating), so that a slow spell of this
shared machine hits both; the speed-up is the median of the per-pair ratios, with their range.
A randomly initialised T5 already has peaked logits here (lm_head std 1 over d_model 128 gives
logits of std ~11), so near-ties that could legitimately reorder the two searches are rare.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from transformers import T5ForConditionalGeneration

from digr.rec.decode import Cache, _decoder_step, _encoder_states, _reorder, prefix_states, recommend
from digr.rec.seqmodel import ENCODER_INPUTS, PAD, ModelConfig, SidRecommender, SidVocab
from digr.rec.sft import load_model
from digr.rec.trie import SidTrie


def random_catalogue(n_items: int, vocab: SidVocab, collide: float, rng: np.random.Generator) -> np.ndarray:
    """(n_items, sid_len) valid SIDs: random 3-tuples, a fraction `collide` of them repeats of
    others, told apart by the suffix code (its rank within the colliding group)."""
    n_fresh = int(n_items * (1 - collide))
    tuples = rng.integers(0, vocab.codebook_size, size=(n_fresh, vocab.levels))
    tuples = np.concatenate([tuples, tuples[rng.integers(0, n_fresh, size=n_items - n_fresh)]])
    _, group = np.unique(tuples, axis=0, return_inverse=True)
    group = group.reshape(-1)
    order = np.argsort(group, kind="stable")
    starts = np.r_[0, np.flatnonzero(np.diff(group[order])) + 1]
    rank = np.arange(n_items) - np.repeat(starts, np.diff(np.r_[starts, n_items]))
    suffix = np.empty(n_items, dtype=np.int64)
    suffix[order] = rank
    keep = suffix < vocab.suffix_size  # drop the rare groups larger than the suffix range
    return np.concatenate([tuples, suffix[:, None]], axis=1)[keep]


def prefix_fn(trie: SidTrie, vocab: SidVocab) -> Callable[[int, torch.Tensor], list[int]]:
    """HF's prefix_allowed_tokens_fn from a precomputed dict, so HF is not slowed by our helper."""
    tokens = vocab.encode(trie.codes).tolist()
    allowed: dict[tuple[int, ...], set[int]] = {}
    for sid in tokens:
        for level in range(vocab.sid_len):
            allowed.setdefault(tuple(sid[:level]), set()).add(sid[level])
    table = {k: sorted(v) for k, v in allowed.items()}
    return lambda _batch_id, sent: table.get(tuple(sent[1:].tolist()), [])


def seconds(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def paired(ours: Callable[[], object], theirs: Callable[[], object], pairs: int,
           repeats: int) -> tuple[list[float], list[float], object, object]:
    """`pairs` rounds, each timing `ours` (the median of `repeats` calls) and `theirs` once, in
    alternating order. Returns the per-round times of each and the last outputs."""
    ours(), theirs()  # warm-up: allocator, lazy inits
    t_ours: list[float] = []
    t_theirs: list[float] = []
    out_ours = out_theirs = None
    for r in range(pairs):
        for side in ((0, 1) if r % 2 == 0 else (1, 0)):
            if side == 0:
                runs = [seconds(ours) for _ in range(repeats)]
                t_ours.append(statistics.median(t for t, _ in runs))
                out_ours = runs[-1][1]
            else:
                t, out_theirs = seconds(theirs)
                t_theirs.append(t)
    return t_ours, t_theirs, out_ours, out_theirs


@torch.no_grad()
def breakdown(model: T5ForConditionalGeneration, vocab: SidVocab, states: list[torch.Tensor],
              enc_kwargs: dict[str, torch.Tensor], mask: torch.Tensor, beam: int) -> str:
    """Time the encoder and each decoder step of our search alone (beam bookkeeping excluded),
    with the first self-attention looked up in `states` as the search does."""
    t0 = time.perf_counter()
    cross, cross_mask = _encoder_states(model, mask, **enc_kwargs)
    parts = [f"encoder+cross K/V {time.perf_counter() - t0:.3f}s"]
    b = mask.shape[0]
    past: list[Cache] = [([], []) for _ in model.decoder.block]
    tokens = torch.full((b, 1), PAD, dtype=torch.long)
    for step in range(vocab.sid_len):
        t0 = time.perf_counter()
        _decoder_step(model, tokens, past, cross, cross_mask, states[step][:1].expand(tokens.numel(), -1))
        parts.append(f"step{step} ({tokens.numel()} rows) {time.perf_counter() - t0:.3f}s")
        past = _reorder(past, torch.arange(beam).expand(b, beam))
        tokens = torch.full((b, beam), vocab.level_offset(step), dtype=torch.long)
    return ", ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", help="a saved SFT model, RUN/sft/model (needs --trie)")
    ap.add_argument("--trie", help="a SidTrie .npz (SidTrie.save) matching --model-dir")
    ap.add_argument("--items", type=int, default=4000)
    ap.add_argument("--suffix-size", type=int, default=4)
    ap.add_argument("--encoder-input", choices=ENCODER_INPUTS, default="items",
                    help="random model only: one encoder position per item, or TIGER's SID tokens")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--history", type=int, default=20)
    ap.add_argument("--beam", type=int, default=20)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--pairs", type=int, default=7, help="interleaved rounds of (ours, HF)")
    ap.add_argument("--repeats", type=int, default=3, help="our calls per round (their median is the round's time)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    if args.model_dir:
        if not args.trie:
            ap.error("--model-dir needs --trie (the SIDs the model was trained on)")
        rec = load_model(args.model_dir)
        trie = SidTrie.load(args.trie)
        vocab = trie.vocab
    else:
        vocab = SidVocab(levels=3, codebook_size=256, suffix_size=args.suffix_size)
        trie = SidTrie.from_codes(random_catalogue(args.items, vocab, 0.03, rng), vocab)
        cfg = ModelConfig(encoder_input=args.encoder_input, content_features=False)
        rec = SidRecommender(vocab, cfg, vocab.encode(trie.codes))
    rec.eval()
    model = rec.t5

    hist = [rng.integers(0, trie.num_items, size=args.history).tolist() for _ in range(args.batch)]
    ids, mask = rec.batch(hist, args.history)
    with torch.no_grad():
        enc_kwargs = rec.encoder_kwargs(ids, mask)  # HF gets the same encoder input, precomputed
    fn = prefix_fn(trie, vocab)

    def ours() -> object:
        return recommend(rec, trie, hist, args.history, beam_size=args.beam, top_k=args.top_k)

    def hf() -> object:
        return model.generate(
            **enc_kwargs,
            attention_mask=mask,
            num_beams=args.beam,
            num_return_sequences=args.top_k,
            prefix_allowed_tokens_fn=fn,
            max_new_tokens=vocab.sid_len,
            do_sample=False,
            early_stopping=False,
            return_dict_in_generate=True,
            output_scores=True,
        )

    # The search builds these itself on its second call with the same weights and trie (and keeps them);
    # built here once more only to say what that costs.
    t_states, states = seconds(lambda: prefix_states(model, trie, vocab))
    ts_ours, ts_hf, out, gen = paired(ours, hf, args.pairs, args.repeats)
    ratios = sorted(h / o for h, o in zip(ts_hf, ts_ours))
    hf_codes = vocab.decode(gen.sequences[:, 1:]).view(args.batch, args.top_k, vocab.sid_len)
    hf_items = trie.lookup(hf_codes.reshape(-1, vocab.sid_len)).view(args.batch, args.top_k)
    same_rows = int((hf_items == out.items).all(dim=1).sum())
    # HF divides the summed log-prob by the generated length (length_penalty 1.0).
    hf_scores = gen.sequences_scores.view(args.batch, args.top_k) * vocab.sid_len
    max_diff = float((hf_scores - out.scores).abs().max())

    print(f"encoder input {rec.cfg.encoder_input} ({ids.shape[1]} positions), "
          f"catalogue {trie.num_items} items, vocab {vocab}, batch {args.batch} x history {args.history}, "
          f"beam {args.beam}, top {args.top_k}, torch threads {torch.get_num_threads()}")
    print(f"identical top-{args.top_k} item lists: {same_rows}/{args.batch} rows; max |score diff| {max_diff:.2e}")
    print(f"HF generate (median of {args.pairs} rounds): {statistics.median(ts_hf):.3f}s "
          f"(range {min(ts_hf):.3f}-{max(ts_hf):.3f})")
    print(f"digr beam_search (median of {args.pairs} rounds): {statistics.median(ts_ours):.3f}s "
          f"(range {min(ts_ours):.3f}-{max(ts_ours):.3f})")
    print(f"speed-up: {statistics.median(ratios):.1f}x (median of the per-round ratios; "
          f"range {ratios[0]:.1f}x-{ratios[-1]:.1f}x)")
    print(f"first-layer prefix states (built once per model and trie, not in the times above): "
          f"{sum(len(x) for x in states)} prefixes in {t_states:.3f}s")
    print("our forward passes alone:", breakdown(model, vocab, states, enc_kwargs, mask, args.beam))


if __name__ == "__main__":
    main()
