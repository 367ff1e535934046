"""Pick SFT / tokenizer settings on the valid split (Ray Tune grid), then run the best to the end.

    python -m jobs.sweep --space SPACE.yaml --output DIR [--config FILE.yaml] [--concurrency N]
        [--no-evaluate] [--debug] [key=value ...]

SPACE.yaml maps dotted config keys to the values to try (`configs/sweep-sft.yaml` is an example).
Each combination trains up to sft in DIR/trials/<overrides>; the best by valid NDCG@10 runs
evaluate in DIR/best (the only test read). DIR/sweep.json holds every trial's score.
Bad input (space, config, output) stops with one line, as every job does (`jobs/_cli.py`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jobs._cli import DEFAULT_CONFIG, check_output, one_line, user_error


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", required=True, help="YAML: {dotted.key: [values]}")
    ap.add_argument("--config", help="YAML config (default: the embedded MovieLens-100K default)")
    ap.add_argument("--output", required=True, help="sweep directory (local)")
    ap.add_argument("--concurrency", type=int, default=1, help="trials at once (1 on a 2-core machine)")
    ap.add_argument("--no-evaluate", action="store_true", help="stop after picking; do not read test")
    ap.add_argument("--debug", action="store_true", help="on bad input, show the traceback")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every trial")
    args = ap.parse_args(argv)
    from digr.pipeline.sweep import parse_space, run_sweep
    from digr.platform.config import ConfigError

    try:
        check_output(args.output)
        if "://" in args.output:
            raise ConfigError(f"--output {args.output}: a sweep directory must be local (trials copy it)")
        try:
            text = Path(args.space).read_text()
        except OSError as e:
            raise ConfigError(f"--space {args.space}: {e.strerror}") from e
        space = parse_space(text, f"--space {args.space}")
        run_sweep(args.config or str(DEFAULT_CONFIG), args.overrides, space, args.output,
                  concurrency=args.concurrency, evaluate_best=not args.no_evaluate)
    except Exception as e:  # noqa: BLE001 - only user errors are caught; the rest re-raises
        found = user_error(e)
        if found is None or args.debug:
            raise
        kind = "config error" if isinstance(found, ConfigError) else "error"
        print(f"{kind}: {one_line(found)} (--debug shows the traceback)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
