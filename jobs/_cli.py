"""The command line every job shares:

    python -m jobs.<stage> [--config FILE.yaml] --output DIR [key=value ...]

With no --config the embedded default (MovieLens-100K) runs. DIR is a local folder or an
s3:// prefix. `key=value` overrides any config field, e.g. `sft.epochs=3 ingest.max_users=300`.
A stage job runs the pipeline up to that stage; finished upstream stages are skipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from digr.config import ConfigError, load

# The embedded default: MovieLens-100K, sized for a 2-core laptop.
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "ml100k.yaml"


def main(stage: str, argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m jobs.{stage}", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML config (default: the embedded MovieLens-100K default)")
    ap.add_argument("--output", required=True, help="run directory, local path or s3:// prefix")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_args(argv)
    from digr.pipeline import PipelineConfig, run_pipeline

    try:
        cfg = load(PipelineConfig, args.config or str(DEFAULT_CONFIG), args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    run_pipeline(cfg, args.output, until=stage)
    return 0
