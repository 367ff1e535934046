"""Constrained beam search: `digr.decode.beam_search` against Hugging Face `generate`.

    .venv/bin/python benchmarks/bench_decode.py                     # TIGER-sized random T5, one position per item
    .venv/bin/python benchmarks/bench_decode.py --encoder-input sid_tokens   # TIGER's flattened SID-token input
    .venv/bin/python benchmarks/bench_decode.py --model-dir RUN/sft/model --trie RUN/tokenize/trie.npz  # a trained one

Decodes the same histories both ways (beam 20, top 10), prints how many rows have identical
top-10 item lists, the median time of each, the speed-up, and where our time goes.
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

from digr.decode import Cache, _decoder_step, _encoder_states, _reorder, recommend
from digr.seqmodel import ENCODER_INPUTS, PAD, ModelConfig, SidRecommender, SidVocab
from digr.sft import load_model
from digr.trie import SidTrie


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


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    fn()  # warm-up: allocator, lazy inits
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


@torch.no_grad()
def breakdown(model: T5ForConditionalGeneration, vocab: SidVocab, enc_kwargs: dict[str, torch.Tensor],
              mask: torch.Tensor, beam: int) -> str:
    """Time the encoder and each decoder step of our search alone (beam bookkeeping excluded)."""
    t0 = time.perf_counter()
    cross, cross_mask = _encoder_states(model, mask, **enc_kwargs)
    parts = [f"encoder+cross K/V {time.perf_counter() - t0:.3f}s"]
    b = mask.shape[0]
    past: list[Cache] = [([], []) for _ in model.decoder.block]
    tokens = torch.full((b, 1), PAD, dtype=torch.long)
    for step in range(vocab.sid_len):
        t0 = time.perf_counter()
        _decoder_step(model, tokens, past, cross, cross_mask)
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
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--hf-repeats", type=int, default=3)
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

    t_ours, out = timed(ours, args.repeats)
    t_hf, gen = timed(hf, args.hf_repeats)
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
    print(f"HF generate (median of {args.hf_repeats}): {t_hf:.3f}s")
    print(f"digr beam_search (median of {args.repeats}): {t_ours:.3f}s")
    print(f"speed-up: {t_hf / t_ours:.1f}x")
    print("our forward passes alone:", breakdown(model, vocab, enc_kwargs, mask, args.beam))


if __name__ == "__main__":
    main()
