"""A/B analysis on hand-computed numbers, and on replayed traffic with a known answer."""

from __future__ import annotations

import json
import math
import random

import pytest

from digr.abtest.analysis import analyse, chi2_sf, ratio_estimate, report_table, srm_check


def simulate(ctr: dict[str, float], users: dict[str, int], seed: int, exposures_per_user: int = 4) -> tuple[list, list]:
    """Users with their own click propensity (beta around the variant's CTR), a few exposures each."""
    rng = random.Random(seed)
    exp, fb = [], []
    for variant, n in users.items():
        for u in range(n):
            p = rng.betavariate(2, 2 / ctr[variant] - 2)  # mean ctr[variant], heterogeneous users
            for k in range(exposures_per_user):
                rid = f"{variant}-{u}-{k}"
                items = [f"i{rng.randrange(1000)}" for _ in range(5)]
                exp.append({"request_id": rid, "user_id": f"{variant}-u{u}", "variant": variant, "items": items,
                            "time": float(k)})
                if rng.random() < p:
                    fb.append({"request_id": rid, "item": items[0], "event": "click", "time": k + 0.5})
    return exp, fb


def test_ratio_estimate_by_hand() -> None:
    # Users: (clicks, exposures) = (1, 2), (0, 2), (3, 4): R = 4 / 8 = 0.5.
    # means 4/3 and 8/3; s_xx = 7/3, s_yy = 4/3, s_xy = 5/3; Var = (7/3 - 5/3 + 1/3) / (3 * 64/9) = 3/64.
    est = ratio_estimate([1, 0, 3], [2, 2, 4])
    assert est.value == 0.5
    assert est.se == pytest.approx(math.sqrt(3 / 64))


def test_chi2_survival_matches_known_values() -> None:
    assert chi2_sf(3.841459, 1) == pytest.approx(0.05, abs=1e-6)
    assert chi2_sf(5.991465, 2) == pytest.approx(0.05, abs=1e-6)
    assert chi2_sf(7.814728, 3) == pytest.approx(0.05, abs=1e-6)
    assert chi2_sf(13.276704, 4) == pytest.approx(0.01, abs=1e-6)
    assert chi2_sf(0.0, 2) == 1.0


def test_srm_by_hand() -> None:
    # 550 vs 450 users against 50/50: chi2 = (50^2 + 50^2) / 500 = 10, p = erfc(sqrt(5)) ~ 0.00157.
    out = srm_check({"A": 550, "B": 450}, {"A": 1.0, "B": 1.0})
    assert out["chi2"] == pytest.approx(10.0)
    assert out["p"] == pytest.approx(math.erfc(math.sqrt(5.0)))
    assert not out["flagged"]  # 0.0016 > 0.001
    assert srm_check({"A": 570, "B": 430}, {"A": 1.0, "B": 1.0})["flagged"]


def test_b_truly_better_is_called() -> None:
    exp, fb = simulate({"A": 0.10, "B": 0.13}, {"A": 3000, "B": 3000}, seed=1)
    report = analyse(exp, fb, {"A": 0.5, "B": 0.5})
    assert report.verdict.startswith("B beats A on ctr"), report.verdict
    lift = report.lifts["B"]["ctr"]
    assert lift["rel_ci"][0] > 0 and lift["diff"] > 0
    assert not report.srm["flagged"]
    assert "B beats A" in report_table(report)


def test_equal_variants_are_not_called() -> None:
    exp, fb = simulate({"A": 0.10, "B": 0.10}, {"A": 3000, "B": 3000}, seed=2)
    report = analyse(exp, fb, {"A": 0.5, "B": 0.5})
    assert report.verdict.startswith("no significant difference"), report.verdict


def test_broken_split_is_flagged_whatever_the_metrics() -> None:
    exp, fb = simulate({"A": 0.10, "B": 0.13}, {"A": 3300, "B": 2700}, seed=3)
    report = analyse(exp, fb, {"A": 0.5, "B": 0.5})
    assert report.srm["flagged"] and report.verdict.startswith("INVALID: sample ratio mismatch")


def test_delta_method_is_wider_than_the_naive_interval_for_clustered_users() -> None:
    exp, fb = simulate({"A": 0.10, "B": 0.10}, {"A": 2000, "B": 2000}, seed=4, exposures_per_user=10)
    s = analyse(exp, fb, {"A": 0.5, "B": 0.5}).variants["A"]
    naive = math.sqrt(s.ctr.value * (1 - s.ctr.value) / s.exposures)
    # Design effect 1 + (m - 1) rho: m = 10 exposures a user, rho = Var(p_user) / (p (1 - p)) with
    # p_user ~ Beta(2, 18): Var = 2 * 18 / (20^2 * 21) = 0.00429, rho = 0.0476, so the se is
    # sqrt(1.43) = 1.196 x the naive one.
    assert s.ctr.se / naive == pytest.approx(1.196, abs=0.06)


def test_bad_feedback_is_counted_and_kept_not_dropped() -> None:
    exp = [{"request_id": "r1", "user_id": "u1", "variant": "A", "items": ["x", "y"], "time": 0.0},
           {"request_id": "r1", "user_id": "u1", "variant": "A", "items": ["x"], "time": 1.0},
           {"request_id": "r2", "user_id": "u2", "variant": "B", "items": ["x"], "time": 0.0}]
    fb = [{"request_id": "r1", "item": "x", "event": "click"},
          {"request_id": "r9", "item": "x", "event": "click"},
          {"request_id": "r1", "item": "z", "event": "click"},
          {"request_id": "r2", "item": "x", "event": "like"}]
    report = analyse(exp, fb, {"A": 1, "B": 1})
    assert report.rejected == {"exposure_duplicate_request_id": 1, "feedback_unknown_request": 1,
                               "feedback_item_not_exposed": 1, "feedback_unknown_event": 1}
    assert [r["reason"] for r in report.rejected_rows][1:] == ["feedback_unknown_request",
                                                                "feedback_item_not_exposed", "feedback_unknown_event"]
    assert report.variants["A"].ctr.value == 1.0 and report.variants["B"].ctr.value == 0.0


def test_unconfigured_variant_is_a_clear_error() -> None:
    exp = [{"request_id": "r1", "user_id": "u1", "variant": "C", "items": ["x"], "time": 0.0}]
    with pytest.raises(ValueError, match=r"without a configured weight: \['C'\]"):
        analyse(exp, [], {"A": 1, "B": 1})


def test_equal_variants_are_called_different_about_5_percent_of_the_time() -> None:
    """The intervals' calibration: 200 A/A tests; a 95% interval excludes 0 in ~5% of them."""
    false = sum(analyse(*simulate({"A": 0.10, "B": 0.10}, {"A": 400, "B": 400}, seed=100 + s),
                        {"A": 0.5, "B": 0.5}).verdict.startswith(("B beats", "B is worse")) for s in range(200))
    assert 2 <= false <= 20, false  # binomial(200, 0.05): mean 10, 99.9% within [2, 20]


def test_the_job_reads_jsonl_prints_the_verdict_and_keeps_bad_rows(tmp_path, capsys) -> None:
    from jobs.abtest import main

    exp, fb = simulate({"sft": 0.10, "grpo": 0.13}, {"sft": 3000, "grpo": 3000}, seed=1)
    (tmp_path / "exp").mkdir()
    half = len(exp) // 2  # two shards, as a sink writes them
    for k, rows in enumerate((exp[:half], exp[half:])):
        (tmp_path / "exp" / f"part-{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "fb.jsonl").write_text("".join(json.dumps(r) + "\n" for r in fb) + "{not json\n")
    rc = main(["--exposures", str(tmp_path / "exp"), "--feedback", str(tmp_path / "fb.jsonl"),
               "--serve-config", "serve/ab.yaml", "--output", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0 and "verdict: grpo beats sft on ctr" in out and "malformed_json 1" in out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["variants"]["sft"]["users"] == 3000 and report["srm"]["flagged"] is False
    assert json.loads((tmp_path / "out" / "rejected.jsonl").read_text().splitlines()[0])["reason"] == "malformed_json"
    assert (tmp_path / "out" / "lift.png").stat().st_size > 1000


@pytest.mark.parametrize("extra, message", [
    (["--weights", "sft=half"], "expected name=weight"),
    ([], "exactly one of --weights and --serve-config"),
])
def test_the_job_names_what_is_wrong(tmp_path, capsys, extra, message) -> None:
    from jobs.abtest import main

    (tmp_path / "e.jsonl").write_text("")
    rc = main(["--exposures", str(tmp_path / "e.jsonl"), "--feedback", str(tmp_path / "missing.jsonl"), *extra])
    assert rc == 2 and message in capsys.readouterr().err


def test_positive_feedback_becomes_the_next_runs_training_data(tmp_path) -> None:
    import pyarrow as pa

    from digr.abtest.analysis import positive_interactions
    from digr.data.ingest import IngestConfig, ingest
    from digr.platform import storage
    from jobs.abtest import export_inter

    exp = [{"request_id": "r1", "user_id": "u1", "variant": "A", "items": ["b", "c"], "time": 10.0},
           {"request_id": "r2", "user_id": "u1", "variant": "A", "items": ["a", "c"], "time": 20.0},
           {"request_id": "r3", "user_id": "anon:r3", "variant": "A", "items": ["a"], "time": 5.0}]
    fb = [{"request_id": "r2", "item": "c", "event": "purchase", "time": 21.0},
          {"request_id": "r1", "item": "b", "event": "click", "time": 11.0},
          {"request_id": "r1", "item": "c", "event": "dismiss", "time": 12.0},
          {"request_id": "r3", "item": "a", "event": "click", "time": 6.0}]
    assert positive_interactions(exp, fb) == {"u1": ["b", "c"]}  # time order; dismiss and anonymous left out

    run = tmp_path / "run"
    storage.write_table(str(run / "ingest" / "items.parquet"), pa.table({
        "item_idx": pa.array([0, 1, 2], pa.int32()), "item_id": ["a", "b", "c"], "title": ["A", "B", "C"],
        "description": ["", "", ""], "brand": ["", "", ""], "categories": ["x", "x", "y"]}))
    storage.write_table(str(run / "ingest" / "sequences.parquet"), pa.table({
        "user_id": ["u1", "u2"], "item_idx": [[0, 1, 2, 0, 1], [2, 1, 0, 2, 1]]}))
    assert export_inter(str(run), exp, fb, str(tmp_path / "next"), "Next") == (1, 2)
    seqs = json.loads((tmp_path / "next" / "Next.inter.json").read_text())
    assert seqs == {"u1": ["a", "b", "c", "a", "b", "b", "c"], "u2": ["c", "b", "a", "c", "b"]}
    res = ingest(IngestConfig(source="inter-json", path=str(tmp_path / "next"), name="Next"))
    assert res.sequences.num_rows == 2  # the pipeline reads the export
