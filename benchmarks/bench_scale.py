"""How cost grows with the catalogue: synthetic data (digr.data.synth) at 10K / 100K / 1M items,
each size in its own process (so peak RSS is that size's), through the code paths a large
catalogue stresses:

    .venv/bin/python benchmarks/bench_scale.py [--sizes 10000 100000 1000000] [--users-per-item 0.5]
        [--mean-length 10] [--skip-prefix-tables-above 2000000]

Per size: generate, write inter-json, ingest (today's single-process ingest), SIDs (3 levels x
256 codes from the item's leaf category and a hash, plus the collision suffix), trie build,
the decoder's prefix tables (`decode.prepare`), one constrained beam search batch (64
histories, beam 20, an untrained model of the Scientific config's shape), and adding 100 items
the way POST /items does (extend_sids + trie add + model tables + prepare, which grows the
prefix tables by the new rows only; target (issue 25) < 1 s at 1M items), first and then the
mean of the next three (the steady state: the first copies the tables into storages with spare
rows); wall and CPU seconds (the box may be shared: CPU seconds are the fairer figure), and peak RSS. Then the
growth of each cost per 10x items.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
STEPS = ("generate", "write", "ingest", "sids", "trie", "prefix_tables", "decode_batch", "add_100", "add_100_next")


def timed(fn, *a, **k):
    w, c = time.perf_counter(), time.process_time()
    out = fn(*a, **k)
    return out, time.perf_counter() - w, time.process_time() - c


def one_size(n_items: int, users_per_item: float, mean_length: float, prefix_limit: int) -> dict:
    import numpy as np
    import torch

    from digr.data.ingest import IngestConfig, ingest
    from digr.data.synth import SynthConfig, generate, write_inter_json
    from digr.rec.decode import prepare, recommend
    from digr.rec.seqmodel import ModelConfig, SidRecommender, SidVocab
    from digr.rec.trie import SidTrie
    from digr.serving.core import extend_sids
    from digr.tokenizer.sids import add_collision_suffix

    torch.set_num_threads(2)
    out: dict = {"items": n_items}
    cfg = SynthConfig(items=n_items, users=max(10, int(n_items * users_per_item)), mean_length=mean_length)
    data, out["generate_s"], out["generate_cpu_s"] = timed(generate, cfg)
    out["interactions"] = int(len(data.seq_items))
    with tempfile.TemporaryDirectory() as tmp:
        _, out["write_s"], out["write_cpu_s"] = timed(write_inter_json, data, Path(tmp))
        res, out["ingest_s"], out["ingest_cpu_s"] = timed(
            ingest, IngestConfig(source="inter-json", path=tmp, name=cfg.name))
    n = res.items.num_rows

    def sids() -> np.ndarray:
        # Level 0 from the leaf category (what a content tokenizer's first level tends to
        # capture), levels 1-2 from a hash of the item: many collisions at 1M, as in practice.
        ids = np.arange(n, dtype=np.int64)
        leaf = data.leaf[np.asarray([int(i[1:]) for i in res.items["item_id"].to_pylist()])]
        h = (ids * 2654435761) % 2**32
        codes = np.stack([leaf % 256, (h >> 8) % 256, (h >> 16) % 256], axis=1)
        return add_collision_suffix(codes)

    full, out["sids_s"], out["sids_cpu_s"] = timed(sids)
    vocab = SidVocab(levels=3, codebook_size=256, suffix_size=int(full[:, 3].max()) + 2)
    trie, out["trie_s"], out["trie_cpu_s"] = timed(SidTrie.from_codes, full, vocab)
    torch.manual_seed(0)
    model = SidRecommender(vocab, ModelConfig(d_model=128, d_kv=32, d_ff=512, num_layers=2, num_decoder_layers=2,
                                              num_heads=4, content_features=False),
                           vocab.encode(torch.from_numpy(full))).eval()
    if n <= prefix_limit:
        _, out["prefix_tables_s"], out["prefix_tables_cpu_s"] = timed(prepare, model, trie)
        from digr.rec.decode import _PREFIX_CACHE

        states = _PREFIX_CACHE[model.t5].states
        out["prefix_tables_mb"] = sum(t.numel() * t.element_size() for t in states) / 2**20 if states else 0.0
    hist = [list(h) for h in res.examples.filter(
        __import__("pyarrow").compute.equal(res.examples["split"], "test")).slice(0, 64)["history"].to_pylist()]
    with torch.no_grad():
        recommend(model, trie, hist[:4], 20, beam_size=20, top_k=10)  # warm-up
        _, out["decode_batch_s"], out["decode_batch_cpu_s"] = timed(recommend, model, trie, hist, 20, beam_size=20,
                                                                    top_k=10)

    def add_100(before: SidTrie, seed: int) -> SidTrie:
        rng = np.random.default_rng(seed)
        codes = np.stack([rng.integers(0, 256, 100) for _ in range(3)], axis=1)
        new = extend_sids(codes, before.codes.cpu().numpy(), vocab.suffix_size)
        after = before.add(new)
        model.add_items(vocab.encode(torch.from_numpy(new)))
        if n <= prefix_limit:
            prepare(model, after)
        return after

    # The first add copies the tables once into storages with spare rows (digr.rec.rows); the
    # ones after it write into the spare rows: the steady-state cost.
    bigger, out["add_100_s"], out["add_100_cpu_s"] = timed(add_100, trie, 1)
    nxt = []
    for seed in (2, 3, 4):
        nxt.append(timed(add_100, bigger, seed))
        bigger = nxt[-1][0]
    out["add_100_next_s"] = sum(x[1] for x in nxt) / len(nxt)
    out["add_100_next_cpu_s"] = sum(x[2] for x in nxt) / len(nxt)
    with torch.no_grad():  # the grown catalogue still decodes (and its new items are reachable)
        got = recommend(model, bigger, hist[:4], 20, beam_size=20, top_k=10)
    assert got.items.shape == (4, 10) and int(bigger.lookup(bigger.codes[-100:]).min()) == n + 300
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--users-per-item", type=float, default=0.5)
    ap.add_argument("--mean-length", type=float, default=10.0)
    ap.add_argument("--skip-prefix-tables-above", type=int, default=2_000_000)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one_size(args.one, args.users_per_item, args.mean_length,
                                              args.skip_prefix_tables_above)))
        return 0
    rows = []
    for n in args.sizes:
        p = subprocess.run([sys.executable, __file__, "--one", str(n), "--users-per-item", str(args.users_per_item),
                            "--mean-length", str(args.mean_length), "--skip-prefix-tables-above",
                            str(args.skip_prefix_tables_above)], capture_output=True, text=True)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{n} items: FAILED\n{p.stderr[-2000:]}")
            continue
        rows.append(json.loads(line[7:]))
        r = rows[-1]
        print(f"{n} items, {r['interactions']} interactions: " + ", ".join(
            f"{s} {r[s + '_s']:.2f}s ({r[s + '_cpu_s']:.2f} CPU)" for s in STEPS if s + "_s" in r)
              + f"; prefix tables {r.get('prefix_tables_mb', 0):.0f} MB; peak RSS {r['peak_rss_gb']:.2f} GB", flush=True)
    print("\n| items | interactions | " + " | ".join(f"{s} (CPU s)" for s in STEPS) + " | peak RSS GB |")
    print("|---|---|" + "---|" * len(STEPS) + "---|")
    for r in rows:
        print(f"| {r['items']} | {r['interactions']} | " + " | ".join(
            f"{r[s + '_cpu_s']:.2f}" if s + "_cpu_s" in r else "skipped" for s in STEPS) + f" | {r['peak_rss_gb']:.2f} |")
    for a, b in zip(rows, rows[1:]):
        f = b["items"] / a["items"]
        print(f"growth {a['items']} -> {b['items']} ({f:.1f}x items): " + ", ".join(
            f"{s} x{b[s + '_cpu_s'] / max(a[s + '_cpu_s'], 1e-6):.1f}" for s in STEPS
            if s + "_cpu_s" in a and s + "_cpu_s" in b))
    return 0


if __name__ == "__main__":
    sys.exit(main())
