"""The human-readable side of a run: a metrics table on stdout and `report.md` with plots."""

from __future__ import annotations

import io
from typing import Any

from digr.platform import storage

METRIC_KEYS = ("hr@5", "hr@10", "ndcg@5", "ndcg@10")


def metrics_table(results: dict[str, dict[str, float]]) -> str:
    """results: {model name: {"hr@5": ..., ...}} -> a Markdown table (also fine on a terminal)."""
    width = max(len(n) for n in results) if results else 5
    lines = [f"| {'model':<{width}} | " + " | ".join(f"{k:>7}" for k in METRIC_KEYS) + " |"]
    lines.append(f"|{'-' * (width + 2)}|" + "|".join("-" * 9 for _ in METRIC_KEYS) + "|")
    for name, m in results.items():
        lines.append(f"| {name:<{width}} | " + " | ".join(f"{m.get(k, float('nan')):7.4f}" for k in METRIC_KEYS) + " |")
    return "\n".join(lines)


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _plot_curves(history: list[dict[str, Any]], keys: tuple[str, ...], title: str) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [h for h in history if "epoch" in h]
    present = [k for k in keys if any(h.get(k) is not None for h in rows)]
    if not present:
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 3.2), squeeze=False)
    for ax, key in zip(axes[0], present):
        pts = [(h["epoch"], h[key]) for h in rows if h.get(key) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 60 else None)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.suptitle(title, y=1.04)
    data = _png(fig)
    plt.close(fig)
    return data


def _plot_usage(usage: list[float]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 3.2))
    ax.bar([f"level {i}" for i in range(len(usage))], [100 * u for u in usage])
    ax.set_ylabel("codes used (%)")
    ax.set_ylim(0, 100)
    ax.set_title("RQ-VAE codebook usage")
    data = _png(fig)
    plt.close(fig)
    return data


def _stage_time(stage: dict[str, Any]) -> str:
    return "cached" if stage["skipped"] else f"{stage['seconds']:.1f} s"


def write_report(run_dir: str, results: dict[str, dict[str, float]], tokenize: dict[str, Any],
                 rqvae_history: list[dict[str, Any]], sft_history: list[dict[str, Any]],
                 manifest: dict[str, Any]) -> str:
    """Write `report.md` and its PNG plots into the run directory; return the report's path."""
    plots: list[tuple[str, str]] = []
    for name, data in (
        ("rqvae_loss.png", _plot_curves(rqvae_history, ("loss", "recon_loss", "quant_loss"), "RQ-VAE training")),
        ("sft_curves.png", _plot_curves(sft_history, ("train_loss", "valid_loss", "valid_ndcg@10"), "SFT")),
        ("codebook_usage.png", _plot_usage(tokenize.get("usage_per_level", [])) if tokenize.get("usage_per_level") else None),
    ):
        if data:
            storage.write_bytes(storage.join(run_dir, "plots", name), data)
            plots.append((name, name.removesuffix(".png").replace("_", " ")))
    stages = manifest.get("stages", {})
    stage_lines = [
        f"| {n} | {_stage_time(s)} | {s.get('rows', '')} |" for n, s in stages.items()
    ]
    usage = ", ".join(f"{100 * u:.1f}%" for u in tokenize.get("usage_per_level", []))
    text = "\n".join([
        "# digr run report",
        "",
        f"Dataset: `{manifest['config']['ingest']['source']}` {manifest['config']['ingest'].get('name', '')}  ",
        f"Code: `{manifest['code_version'].get('git_commit')}` (source {manifest['code_version']['source_hash']})  ",
        f"Codebook version: `{tokenize.get('codebook_version')}`",
        "",
        "## Test split (leave-last-out, full catalogue)",
        "",
        metrics_table(results),
        "",
        "## Semantic IDs",
        "",
        f"- collision rate before the suffix: {100 * tokenize.get('collision_rate', float('nan')):.2f}%",
        f"- codebook usage per level: {usage}",
        f"- largest suffix: {tokenize.get('max_suffix')}",
        "",
        "## Stages",
        "",
        "| stage | time | rows |",
        "|---|---|---|",
        *stage_lines,
        "",
        "## Plots",
        "",
        *[f"![{alt}](plots/{name})" for name, alt in plots],
        "",
    ])
    path = storage.join(run_dir, "report.md")
    storage.write_text(path, text)
    return path
