"""A/B analysis: exposures joined with feedback -> per-variant metrics, intervals, lift, SRM, verdict.

Records (one dict each; JSONL or Parquet rows):
  exposure  {"request_id", "user_id", "variant", "items": [item_id, ...], "time", "model_version"?, ...}
  feedback  {"request_id", "item", "event": "click" | "purchase" | "dismiss", "time"}

The unit of randomisation is the user (the endpoint assigns variants by a sticky hash of
user_id), so a user's exposures are not independent: ratio metrics over exposures get their
variance by the delta method over per-user sums (Deng, Knoblich & Lu, "Applying the Delta Method
in Metric Analytics", KDD 2018), not the naive binomial one, which is too narrow.

  CTR           clicked exposures / exposures   (an exposure is clicked when any of its items is)
  purchase rate exposures with a purchase / exposures
  hit rate      users with a click or purchase on an exposed item / users

Lift of a variant over the control: the difference and the relative lift (B / A - 1) with 95%
intervals (delta method, the two groups independent). Sample-ratio mismatch: a chi-square test
of the users per variant against the configured weights; p < 0.001 (the usual threshold) marks
the test invalid whatever the metrics say. Bad feedback (unknown request, item not exposed in
it, unknown event) is counted and kept aside with its reason, never dropped silently.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

EVENTS = ("click", "purchase", "dismiss")
SRM_P = 0.001
Z95 = NormalDist().inv_cdf(0.975)


@dataclass(frozen=True)
class Estimate:
    value: float
    se: float

    @property
    def ci(self) -> tuple[float, float]:
        return self.value - Z95 * self.se, self.value + Z95 * self.se


@dataclass
class VariantStats:
    users: int = 0
    exposures: int = 0
    ctr: Estimate = Estimate(0.0, 0.0)
    purchase_rate: Estimate = Estimate(0.0, 0.0)
    hit_rate: Estimate = Estimate(0.0, 0.0)


@dataclass
class Report:
    variants: dict[str, VariantStats]
    control: str
    lifts: dict[str, dict[str, dict[str, Any]]]     # variant -> metric -> {"diff", "diff_ci", "rel", "rel_ci"}
    srm: dict[str, Any]                             # {"chi2", "p", "flagged", "expected_share", "observed_share"}
    verdict: str
    rejected: dict[str, int] = field(default_factory=dict)
    rejected_rows: list[dict[str, Any]] = field(default_factory=list)


def ratio_estimate(num: list[float], den: list[float]) -> Estimate:
    """sum(num) / sum(den) over units (users), with the delta-method standard error:
    Var(R) ~= (s_num^2 - 2 R s_num,den + R^2 s_den^2) / (n mean_den^2)."""
    n = len(num)
    if n == 0 or sum(den) == 0:
        return Estimate(float("nan"), float("nan"))
    mx, my = sum(num) / n, sum(den) / n
    r = mx / my
    if n < 2:
        return Estimate(r, float("nan"))
    sxx = sum((x - mx) ** 2 for x in num) / (n - 1)
    syy = sum((y - my) ** 2 for y in den) / (n - 1)
    sxy = sum((x - mx) * (y - my) for x, y in zip(num, den)) / (n - 1)
    var = max(sxx - 2 * r * sxy + r * r * syy, 0.0) / (n * my * my)
    return Estimate(r, math.sqrt(var))


def chi2_sf(x: float, df: int) -> float:
    """P(X > x) for X ~ chi-square(df), closed forms (exact for integer df)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if x <= 0:
        return 1.0
    half = x / 2
    if df % 2 == 0:  # Q = e^-x/2 sum_{i < df/2} (x/2)^i / i!
        term, total = 1.0, 1.0
        for i in range(1, df // 2):
            term *= half / i
            total += term
        return min(1.0, math.exp(-half) * total)
    # odd df: Q = erfc(sqrt(x/2)) + e^-x/2 sqrt(2x/pi) sum_{i < (df-1)/2} x^i / (1*3*...*(2i+1))
    total, term = 0.0, 1.0
    for i in range((df - 1) // 2):
        term = term * x / (2 * i + 1) if i else 1.0
        total += term
    return min(1.0, math.erfc(math.sqrt(half)) + math.exp(-half) * math.sqrt(2 * x / math.pi) * total)


def srm_check(users: Mapping[str, int], weights: Mapping[str, float]) -> dict[str, Any]:
    """Chi-square of observed users per variant against the configured weights."""
    unknown = set(users) - set(weights)
    if unknown:
        raise ValueError(f"exposures name variants without a configured weight: {sorted(unknown)}")
    total_w = sum(weights.values())
    n = sum(users.values())
    expected = {v: n * w / total_w for v, w in weights.items()}
    chi2 = sum((users.get(v, 0) - e) ** 2 / e for v, e in expected.items() if e > 0)
    p = chi2_sf(chi2, len(expected) - 1) if len(expected) > 1 else 1.0
    return {"chi2": chi2, "p": p, "flagged": p < SRM_P,
            "expected_share": {v: w / total_w for v, w in weights.items()},
            "observed_share": {v: users.get(v, 0) / n if n else 0.0 for v in weights}}


def _lift(a: Estimate, b: Estimate) -> dict[str, Any]:
    diff = b.value - a.value
    diff_se = math.sqrt(a.se ** 2 + b.se ** 2)
    rel = b.value / a.value - 1 if a.value else float("nan")
    rel_se = math.sqrt(b.se ** 2 / a.value ** 2 + b.value ** 2 * a.se ** 2 / a.value ** 4) if a.value else float("nan")
    return {"diff": diff, "diff_ci": (diff - Z95 * diff_se, diff + Z95 * diff_se),
            "rel": rel, "rel_ci": (rel - Z95 * rel_se, rel + Z95 * rel_se)}


def analyse(exposures: Iterable[Mapping[str, Any]], feedback: Iterable[Mapping[str, Any]],
            weights: Mapping[str, float], control: str | None = None, metric: str = "ctr") -> Report:
    """Join, aggregate per user, then per variant. weights: the configured {variant: weight}
    (the endpoint's user_config). control: the baseline variant (default: the first in weights)."""
    if metric not in ("ctr", "purchase_rate", "hit_rate"):
        raise ValueError(f"metric must be ctr, purchase_rate or hit_rate, got {metric!r}")
    control = control or next(iter(weights))
    if control not in weights:
        raise ValueError(f"control {control!r} is not a configured variant ({sorted(weights)})")
    shown: dict[str, tuple[str, str, set[str]]] = {}  # request_id -> (user, variant, items)
    rejected: dict[str, int] = defaultdict(int)
    rejected_rows: list[dict[str, Any]] = []

    def reject(row: Mapping[str, Any], reason: str) -> None:
        rejected[reason] += 1
        rejected_rows.append({"reason": reason, "row": dict(row)})

    for e in exposures:
        rid, user, variant = e.get("request_id"), e.get("user_id"), e.get("variant")
        if "_malformed" in e:  # a line that was not JSON (the reader keeps it with its place)
            reject(e, "malformed_json")
        elif not rid or not user or not variant or not isinstance(e.get("items"), (list, tuple)):
            reject(e, "exposure_missing_field")
        elif rid in shown:
            reject(e, "exposure_duplicate_request_id")
        else:
            shown[rid] = (str(user), str(variant), {str(i) for i in e["items"]})
    unknown = {v for _, v, _ in shown.values()} - set(weights)
    if unknown:
        raise ValueError(f"exposures name variants without a configured weight: {sorted(unknown)} "
                         f"(configured: {sorted(weights)})")
    clicked: set[str] = set()
    bought: set[str] = set()
    for f in feedback:
        rid, item, event = f.get("request_id"), f.get("item"), f.get("event")
        if "_malformed" in f:
            reject(f, "malformed_json")
        elif event not in EVENTS:
            reject(f, "feedback_unknown_event")
        elif rid not in shown:
            reject(f, "feedback_unknown_request")
        elif str(item) not in shown[rid][2]:
            reject(f, "feedback_item_not_exposed")
        elif event == "click":
            clicked.add(rid)
        elif event == "purchase":
            bought.add(rid)

    per_user: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0, 0]))
    variant_of: dict[str, str] = {}
    for rid, (user, variant, _) in shown.items():
        if variant_of.setdefault(user, variant) != variant:
            reject({"request_id": rid, "user_id": user, "variant": variant}, "user_in_two_variants")
            continue
        row = per_user[variant][user]
        row[0] += 1
        row[1] += rid in clicked
        row[2] += rid in bought

    stats: dict[str, VariantStats] = {}
    for variant in weights:
        rows = list(per_user.get(variant, {}).values())
        n = [r[0] for r in rows]
        hits = [1.0 if (r[1] or r[2]) else 0.0 for r in rows]
        stats[variant] = VariantStats(
            users=len(rows), exposures=sum(n),
            ctr=ratio_estimate([r[1] for r in rows], n),
            purchase_rate=ratio_estimate([r[2] for r in rows], n),
            hit_rate=ratio_estimate(hits, [1.0] * len(rows)),
        )
    srm = srm_check({v: s.users for v, s in stats.items()}, weights)
    lifts = {v: {m: _lift(getattr(stats[control], m), getattr(s, m)) for m in ("ctr", "purchase_rate", "hit_rate")}
             for v, s in stats.items() if v != control}
    if srm["flagged"]:
        verdict = (f"INVALID: sample ratio mismatch (chi2 {srm['chi2']:.1f}, p {srm['p']:.2g} < {SRM_P}); "
                   "the split is broken, do not read the metrics")
    else:
        parts = []
        for v, by_metric in lifts.items():
            lo, hi = by_metric[metric]["diff_ci"]
            if lo > 0:
                parts.append(f"{v} beats {control} on {metric} ({by_metric[metric]['rel']:+.1%}, 95% CI "
                             f"{by_metric[metric]['rel_ci'][0]:+.1%} to {by_metric[metric]['rel_ci'][1]:+.1%})")
            elif hi < 0:
                parts.append(f"{v} is worse than {control} on {metric} ({by_metric[metric]['rel']:+.1%})")
            else:
                parts.append(f"no significant difference between {v} and {control} on {metric} "
                             f"(95% CI of the difference {lo:+.4f} to {hi:+.4f})")
        verdict = "; ".join(parts) or "only one variant: nothing to compare"
    return Report(stats, control, lifts, srm, verdict, dict(rejected), rejected_rows)


def report_table(report: Report) -> str:
    """The per-variant table and the lifts, as Markdown."""
    lines = ["| variant | users | exposures | CTR (95% CI) | purchase rate (95% CI) | hit rate (95% CI) |",
             "|---|---|---|---|---|---|"]
    for v, s in report.variants.items():
        cells = [f"{e.value:.4f} ({e.ci[0]:.4f}-{e.ci[1]:.4f})" for e in (s.ctr, s.purchase_rate, s.hit_rate)]
        lines.append(f"| {v}{' (control)' if v == report.control else ''} | {s.users} | {s.exposures} | "
                     + " | ".join(cells) + " |")
    lines.append("")
    for v, by_metric in report.lifts.items():
        for m, lift in by_metric.items():
            if not math.isfinite(lift["rel"]):
                lines.append(f"lift {v} vs {report.control}, {m}: n/a (the control's {m} is 0 or undefined)")
                continue
            lines.append(f"lift {v} vs {report.control}, {m}: {lift['rel']:+.2%} "
                         f"(95% CI {lift['rel_ci'][0]:+.2%} to {lift['rel_ci'][1]:+.2%}); "
                         f"difference {lift['diff']:+.4f} ({lift['diff_ci'][0]:+.4f} to {lift['diff_ci'][1]:+.4f})")
    srm = report.srm
    lines.append(f"\nsample ratio: observed {', '.join(f'{v} {s:.3f}' for v, s in srm['observed_share'].items())} "
                 f"vs configured {', '.join(f'{v} {s:.3f}' for v, s in srm['expected_share'].items())}: "
                 f"chi2 {srm['chi2']:.2f}, p {srm['p']:.3g} -> {'MISMATCH' if srm['flagged'] else 'ok'}")
    if report.rejected:
        lines.append("rejected rows (kept aside): " + ", ".join(f"{k} {n}" for k, n in sorted(report.rejected.items())))
    lines.append(f"\nverdict: {report.verdict}")
    return "\n".join(lines)


def positive_interactions(exposures: Iterable[Mapping[str, Any]], feedback: Iterable[Mapping[str, Any]],
                          events: tuple[str, ...] = ("click", "purchase")) -> dict[str, list[str]]:
    """What users chose from their recommendations, for the next training run: {user_id: [item,
    ...]} in time order, one entry per (request, item) with any of `events` on an exposed item.
    Anonymous users (no user_id at request time) are left out: they have no sequence to extend."""
    shown = {e["request_id"]: e for e in exposures
             if e.get("request_id") and e.get("user_id") and isinstance(e.get("items"), (list, tuple))}
    picked: dict[tuple[str, str], float] = {}
    for f in feedback:
        e = shown.get(f.get("request_id"))
        if e is None or f.get("event") not in events or str(f.get("item")) not in {str(i) for i in e["items"]}:
            continue
        if str(e["user_id"]).startswith("anon:"):
            continue
        key = (f["request_id"], str(f["item"]))
        t = float(f.get("time") or e.get("time") or 0.0)
        picked[key] = min(t, picked.get(key, t))
    out: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for (rid, item), t in picked.items():
        out[str(shown[rid]["user_id"])].append((t, item))
    return {u: [i for _, i in sorted(rows)] for u, rows in out.items()}
