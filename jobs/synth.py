"""Synthetic Amazon-shaped data (digr.data.synth) for scale checks, in the formats ingest reads.

    python -m jobs.synth --output DIR [--items N] [--users N] [--mean-length L] [--seed S]
        [--format inter-json|amazon-2023|both] [--gzip] [--name Synth]

inter-json: DIR/<name>.inter.json + <name>.item.json (ingest.source=inter-json ingest.path=DIR
ingest.name=<name>); amazon-2023: DIR/<name>.jsonl + meta_<name>.jsonl (ingest.source=amazon-2023).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.synth", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", required=True)
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--users", type=int, default=5_000)
    ap.add_argument("--mean-length", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="Synth")
    ap.add_argument("--format", choices=["inter-json", "amazon-2023", "both"], default="inter-json")
    ap.add_argument("--gzip", action="store_true", help="amazon-2023 files as .jsonl.gz")
    args = ap.parse_args(argv)
    from digr.data.synth import SynthConfig, generate, write_amazon_2023, write_inter_json

    try:
        cfg = SynthConfig(items=args.items, users=args.users, mean_length=args.mean_length, seed=args.seed,
                          name=args.name)
    except ValueError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    data = generate(cfg)
    print(f"generated {cfg.items} items, {cfg.users} users, {len(data.seq_items)} interactions "
          f"in {time.perf_counter() - t0:.1f}s")
    out = Path(args.output)
    written = []
    if args.format in ("inter-json", "both"):
        written += write_inter_json(data, out)
    if args.format in ("amazon-2023", "both"):
        written += write_amazon_2023(data, out, compress=args.gzip)
    print(f"wrote {', '.join(str(p) for p in written)} ({time.perf_counter() - t0:.1f}s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
