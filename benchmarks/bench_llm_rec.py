"""The LLM backbone (SmolLM2-135M + LoRA, SID tokens) against the T5 SFT model of a finished
run, on the same test users, same protocol (full catalogue, seen items excluded, top 10).

    .venv/bin/python benchmarks/bench_llm_rec.py [--run runs/ml100k] [--steps 250] [--users 100] [--grpo-steps 0]

Training data: each user's last `--per-user` train rows as next-SID pairs plus the alignment
tasks (SID <-> title) for every item; `--steps` batches of 16. The LLM's beam (20) is filtered
for seen items after decoding, then cut to 10. Prints HR@10 / NDCG@10 for both models and the
training and decoding times. With --grpo-steps N, N GRPO updates (beam groups of 8, the
default rule reward) follow the SFT and the LLM is scored again. CPU-sized: a real comparison wants a GPU and many more steps.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=str(REPO / "runs" / "ml100k"))
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--per-user", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grpo-steps", type=int, default=0)
    ap.add_argument("--grpo-batch", type=int, default=8)
    args = ap.parse_args()

    from digr.data.metrics import hr_ndcg
    from digr.eval.evaluate import test_rows
    from digr.llmrec.backbone import LLMRecConfig, load_backbone, recommend_llm, task_pairs, train_backbone
    from digr.pipeline.stages import load_sids
    from digr.platform import storage
    from digr.rec.decode import recommend
    from digr.rec.sft import load_model
    from digr.rec.sft_data import select_examples
    from digr.rec.trie import SidTrie

    run = args.run
    torch.manual_seed(args.seed)
    examples = storage.read_table(f"{run}/ingest/examples.parquet")
    sequences = storage.read_table(f"{run}/ingest/sequences.parquet")
    items = storage.read_table(f"{run}/ingest/items.parquet").sort_by("item_idx")
    sids, _ = load_sids(f"{run}/tokenize")
    trie = SidTrie.from_bytes(storage.read_bytes(f"{run}/tokenize/trie.npz"))
    manifest = storage.read_json(f"{run}/manifest.json")
    max_history = int(manifest["config"]["sft"]["max_history"])
    train = select_examples(examples, "train", len(sids), max_per_user=args.per_user)
    titles = [str(t or "") for t in items["title"].to_pylist()]
    cfg = LLMRecConfig(steps=args.steps, batch_size=16, lr=1e-3, max_history=max_history, seed=args.seed,
                       tasks=("next_sid", "sid_to_title", "title_to_sid"))
    pairs = task_pairs(train.histories(), train.targets.tolist(), sids, titles, None, cfg.tasks, max_history,
                       np.random.default_rng(args.seed))
    rows = test_rows(examples, sequences, "test")
    pick = np.random.default_rng(args.seed).choice(len(rows["target"]), size=min(args.users, len(rows["target"])),
                                                   replace=False)
    histories = [rows["history"][i] for i in pick]
    seen = [set(rows["seen"][i]) for i in pick]
    targets = rows["target"][pick]
    print(f"run {run}: {len(sids)} items, {len(pairs)} training pairs ({len(train)} next-SID), "
          f"{len(pick)} test users, {args.steps} steps x 16")

    t0 = time.perf_counter()
    model, tok, table = load_backbone(cfg, trie.vocab)
    losses = train_backbone(model, tok, pairs, cfg)
    train_s = time.perf_counter() - t0

    def rank_llm() -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        ranked = np.full((len(pick), 10), -1, dtype=np.int64)
        for start in range(0, len(pick), 8):
            out = recommend_llm(model, tok, table, trie, sids, histories[start:start + 8], max_history, beam_size=20,
                                top_k=20)
            for r, row in enumerate(out):
                keep = [int(i) for i in row if i >= 0 and i not in seen[start + r]][:10]
                ranked[start + r, : len(keep)] = keep
        return ranked, time.perf_counter() - t0

    ranked_llm, llm_s = rank_llm()
    results = [("SmolLM2-135M + LoRA (SID tokens)", ranked_llm, llm_s)]
    if args.grpo_steps:
        from digr.llmrec.backbone import train_llm_grpo
        from digr.rl.grpo import GRPOConfig

        gcfg = GRPOConfig(steps=args.grpo_steps, batch_size=args.grpo_batch, group_size=8, rollout="beam", lr=1e-5,
                          max_history=max_history, seed=args.seed)
        t0 = time.perf_counter()
        hist = train_llm_grpo(model, tok, table, trie, sids, train.histories(), train.targets, None, gcfg)
        print(f"LLM GRPO {args.grpo_steps} steps in {(time.perf_counter() - t0) / 60:.1f} min, reward "
              f"{np.mean([h['reward'] for h in hist[:10]]):.3f} -> {np.mean([h['reward'] for h in hist[-10:]]):.3f}")
        ranked_grpo, grpo_s = rank_llm()
        results.append(("SmolLM2-135M + LoRA + GRPO", ranked_grpo, grpo_s))

    t5 = load_model(f"{run}/sft/model").eval()
    exclude = torch.zeros((len(pick), t5.n_items), dtype=torch.bool)
    for r, s in enumerate(seen):
        exclude[r, list(s)] = True
    t0 = time.perf_counter()
    ranked_t5 = recommend(t5, trie, histories, max_history, beam_size=20, top_k=10, exclude=exclude).items.numpy()
    t5_s = time.perf_counter() - t0

    print(f"LLM training {train_s / 60:.1f} min, loss {np.mean(losses[:10]):.2f} -> {np.mean(losses[-10:]):.2f}")
    print("| model | HR@10 | NDCG@10 | decode s |")
    print("|---|---|---|---|")
    for name, ranked, secs in (*results, ("T5 SFT (the run's)", ranked_t5, t5_s)):
        m = hr_ndcg(ranked, targets, ks=(10,))
        print(f"| {name} | {m['hr@10']:.4f} | {m['ndcg@10']:.4f} | {secs:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
