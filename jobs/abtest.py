"""Which A/B variant won: exposures joined with feedback (digr.abtest.analysis).

    python -m jobs.abtest --exposures PATH --feedback PATH (--weights sft=0.5,grpo=0.5 | --serve-config serve/ab.yaml)
        [--control NAME] [--metric ctr|purchase_rate|hit_rate] [--output DIR]

PATH: a JSONL or Parquet file, or a folder of them (local or s3://), as the endpoint's exposure
log writes them. Prints per variant: users, exposures, CTR / purchase rate / hit rate with 95%
intervals (delta method over users), the lift over the control with its interval, the
sample-ratio-mismatch check against the configured weights, and the verdict. --output gets
report.json, rejected.jsonl (bad rows with their reason) and lift.png.

Back into training: `--export-inter DIR --run-dir RUN` writes DIR/<name>.inter.json (RUN's
sequences with every click / purchase on a served item appended, in time order) and
<name>.item.json (RUN's item text), so `python -m jobs.pipeline ingest.source=inter-json
ingest.path=DIR ingest.name=<name>` trains on what users did.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import sys
from typing import Any

import yaml

from digr.platform import storage


class InputError(ValueError):
    """A file or setting the user can fix."""


def read_records(uri: str) -> list[dict[str, Any]]:
    """Rows of a .jsonl / .parquet file, or of every such file in a folder (sorted by name)."""
    if not storage.exists(uri):
        raise InputError(f"{uri}: not found")
    files = [uri] if uri.endswith((".jsonl", ".parquet")) else sorted(
        storage.list_files(uri, ".jsonl") + storage.list_files(uri, ".parquet"))
    if not files:
        raise InputError(f"{uri}: no .jsonl or .parquet files in it")
    rows: list[dict[str, Any]] = []
    for f in files:
        if f.endswith(".parquet"):
            rows += storage.read_table(f).to_pylist()
            continue
        for n, line in enumerate(storage.read_bytes(f).decode().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    rows.append({"_malformed": line, "_where": f"{f}:{n}: {e.msg}"})
    return rows


def weights_from(args: argparse.Namespace) -> dict[str, float]:
    if bool(args.weights) == bool(args.serve_config):
        raise InputError("give exactly one of --weights and --serve-config")
    if args.weights:
        try:
            return {k: float(v) for k, v in (kv.split("=", 1) for kv in args.weights.split(","))}
        except ValueError as e:
            raise InputError(f"--weights {args.weights!r}: expected name=weight,name=weight") from e
    try:
        cfg = yaml.safe_load(open(args.serve_config))
    except OSError as e:
        raise InputError(f"--serve-config {args.serve_config}: {e.strerror}") from e
    for app in cfg.get("applications", []):
        for dep in app.get("deployments", []):
            w = (dep.get("user_config") or {}).get("weights")
            if w:
                return {str(k): float(v) for k, v in w.items()}
        variants = (app.get("args") or {}).get("variants")
        if variants:
            return {v["name"]: float(v.get("weight", 1.0)) for v in variants}
    raise InputError(f"--serve-config {args.serve_config}: no Gateway user_config weights or args.variants in it")


def plot(report: Any, metric: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report.variants)
    est = [getattr(report.variants[v], metric) for v in names]
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.bar(names, [e.value for e in est], yerr=[e.ci[1] - e.value for e in est], capsize=6)
    ax.set_ylabel(f"{metric} (95% CI)")
    ax.set_title(report.verdict[:60] + ("..." if len(report.verdict) > 60 else ""), fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def export_inter(run_dir: str, exposures: list[dict], feedback: list[dict], out: str, name: str) -> tuple[int, int]:
    """RUN's sequences (source ids) + positive feedback -> an inter-json dataset in `out`."""
    from digr.abtest.analysis import positive_interactions

    try:
        items = storage.read_table(storage.join(run_dir, "ingest", "items.parquet")).sort_by("item_idx")
        seqs = storage.read_table(storage.join(run_dir, "ingest", "sequences.parquet"))
    except (OSError, FileNotFoundError) as e:
        raise InputError(f"--run-dir {run_dir}: no finished ingest in it ({e})") from e
    ids = items["item_id"].to_pylist()
    sequences = {u: [ids[i] for i in s] for u, s in zip(seqs["user_id"].to_pylist(), seqs["item_idx"].to_pylist())}
    new = positive_interactions(exposures, feedback)
    known = set(ids)
    n_new = 0
    for user, picked in new.items():
        picked = [i for i in picked if i in known]  # items added while serving have no text here
        sequences.setdefault(user, []).extend(picked)
        n_new += len(picked)
    meta = {r["item_id"]: {"title": r["title"], "description": r["description"], "brand": r["brand"],
                           "categories": r["categories"]} for r in items.to_pylist()}
    storage.write_text(storage.join(out, f"{name}.inter.json"), json.dumps(sequences))
    storage.write_text(storage.join(out, f"{name}.item.json"), json.dumps(meta))
    return len(new), n_new


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.abtest", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exposures", required=True)
    ap.add_argument("--feedback", required=True)
    ap.add_argument("--weights", help="configured split, e.g. sft=0.5,grpo=0.5")
    ap.add_argument("--serve-config", help="a serve YAML whose Gateway user_config holds the weights")
    ap.add_argument("--control", help="the baseline variant (default: the first configured)")
    ap.add_argument("--metric", default="ctr", choices=["ctr", "purchase_rate", "hit_rate"])
    ap.add_argument("--output", help="folder for report.json, rejected.jsonl and lift.png")
    ap.add_argument("--export-inter", help="folder for an inter-json dataset: RUN's sequences + positive feedback")
    ap.add_argument("--run-dir", help="the run whose ingest the export extends (with --export-inter)")
    ap.add_argument("--name", default="Feedback", help="file stem of the exported dataset")
    args = ap.parse_args(argv)
    from digr.abtest.analysis import analyse, report_table

    try:
        if bool(args.export_inter) != bool(args.run_dir):
            raise InputError("--export-inter and --run-dir go together")
        weights = weights_from(args)
        exposures, feedback = read_records(args.exposures), read_records(args.feedback)
        report = analyse(exposures, feedback, weights, args.control, args.metric)
    except (InputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report_table(report))
    if args.output:
        storage.write_json(storage.join(args.output, "report.json"),
                           json.loads(json.dumps(dataclasses.asdict(report) | {"rejected_rows": None}, default=str)))
        storage.write_text(storage.join(args.output, "rejected.jsonl"),
                           "".join(json.dumps(r, default=str) + "\n" for r in report.rejected_rows))
        storage.write_bytes(storage.join(args.output, "lift.png"), plot(report, args.metric))
        print(f"\nreport: {storage.join(args.output, 'report.json')}")
    if args.export_inter:
        n_users, n_new = export_inter(args.run_dir, exposures, feedback, args.export_inter, args.name)
        print(f"exported {n_new} clicked / purchased items for {n_users} users to "
              f"{storage.join(args.export_inter, args.name + '.inter.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
