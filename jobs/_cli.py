"""The command line every job shares:

    python -m jobs.<stage> [--config FILE.yaml] --output DIR [--debug] [key=value ...]

With no --config the embedded default (MovieLens-100K) runs. DIR is a local folder or an
s3:// prefix. `key=value` overrides any config field, e.g. `sft.epochs=3 ingest.max_users=300`.
A stage job runs the pipeline up to that stage; finished upstream stages are skipped.
Bad input (a config key or value, a data file, the output location) stops with one line on
stderr that names the file or field, and exit code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from digr.data.formats import IngestError
from digr.platform.config import ConfigError, load

# The embedded default: MovieLens-100K, sized for a 2-core laptop.
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "ml100k.yaml"

# What a user can fix: these stop a run with one line, not a traceback.
USER_ERRORS = (ConfigError, IngestError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError)


class OutputError(ValueError):
    """--output cannot hold a run directory."""


def check_output(output: str) -> None:
    """A local --output must be a folder, or a path whose first existing parent is a writable
    folder; s3:// and other URIs are checked by the first write."""
    if "://" in output:
        return
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise OutputError(f"--output {output}: is a file, not a folder; give a folder (created if "
                          "missing) or an s3:// prefix")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"--output {output}: {parent} is a file, so the folder cannot be created there")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"--output {output}: {parent} is not writable; choose a folder you can write to")


def user_error(e: BaseException) -> BaseException | None:
    """The user-fixable error behind `e` (a Ray task error wraps the one its task raised)."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, USER_ERRORS + (OutputError,)):
            return e
        e = getattr(e, "cause", None) or e.__cause__
        seen += 1
    return None


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())  # a YAML parser's or a file error's message can span lines
    if isinstance(e, OSError) and e.filename and str(e.filename) not in text:
        text = f"{e.filename}: {text}"
    return text


def main(stage: str, argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m jobs.{stage}", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML config (default: the embedded MovieLens-100K default)")
    ap.add_argument("--output", required=True, help="run directory, local path or s3:// prefix")
    ap.add_argument("--debug", action="store_true", help="on bad input, show the traceback")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_args(argv)
    from digr.pipeline.run import PipelineConfig, run_pipeline

    try:
        check_output(args.output)
        cfg = load(PipelineConfig, args.config or str(DEFAULT_CONFIG), args.overrides)
        run_pipeline(cfg, args.output, until=stage)
    except Exception as e:  # noqa: BLE001 - only user errors are caught; the rest re-raises
        found = user_error(e)
        if found is None or args.debug:
            raise
        kind = "config error" if isinstance(found, ConfigError) else "error"
        print(f"{kind}: {one_line(found)} (--debug shows the traceback)", file=sys.stderr)
        return 2
    return 0
