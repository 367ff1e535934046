"""GRPO on top of a finished SFT run: SFT alone, + GRPO (rule reward), + QARM bonus, side by
side over several seeds, on the test and the valid split; then rollout and trainer throughput
with and without DeepSpeed.

    .venv/bin/python benchmarks/bench_quality.py --output runs/bench-scientific      # first: the SFT run
    .venv/bin/python benchmarks/bench_grpo.py --run runs/bench-scientific [--seeds 0 1 2] [key=value ...]

`key=value` overrides the GRPO config (e.g. `steps=300 lr=3e-5 rollout=beam`). The SFT model
is one trained model (seeds vary GRPO only). The QARM variant needs q_i from the label stage
(`<run>/label/quality.parquet`); without it every q is 0, the variant would equal the rule
reward, and it is skipped with a note. Test predictions of every model and seed are written
as JSONL for ../shared/tools/score.py, which recomputes the test metrics independently.
Issue 4's bar: GRPO must raise test NDCG@10 over SFT; the script says whether it did.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SCORER = REPO.parent / "shared" / "tools" / "score.py"
METRICS = ("hr@5", "hr@10", "ndcg@5", "ndcg@10")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=str(REPO / "runs" / "bench-scientific"), help="a finished pipeline run directory")
    ap.add_argument("--output", default="", help="default: <run>/bench-grpo")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--throughput-steps", type=int, default=10, help="0 = skip the DDP/DeepSpeed timing runs")
    ap.add_argument("--skip-quality", action="store_true", help="only the throughput runs")
    ap.add_argument("overrides", nargs="*", help="grpo config key=value")
    args = ap.parse_args()

    from digr.data.metrics import EMPTY, write_predictions
    from digr.eval.evaluate import EvalConfig, rank_generative, score, test_rows
    from digr.pipeline.run import start_local_ray
    from digr.platform import storage
    from digr.platform.config import from_dict, merge_dicts, parse_overrides
    from digr.platform.scaling import ScalingConfig
    from digr.rec.sft import load_model, save_model
    from digr.rl.grpo import DeepSpeedSettings, GRPOConfig, run_grpo
    from digr.rl.rewards import RewardConfig

    run = Path(args.run)
    out = Path(args.output or run / "bench-grpo")
    out.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((run / "manifest.json").read_text())
    sft_cfg = manifest["config"]["sft"]
    defaults = {"max_history": sft_cfg["max_history"], "valid_users": sft_cfg["valid_users"],
                "threads_per_worker": 2, "scaling": {"cpus_per_worker": 2}}
    base = from_dict(GRPOConfig, merge_dicts(defaults, parse_overrides(args.overrides)))
    start_local_ray(4)  # GRPO trains on Ray Train: see pipeline.start_local_ray

    examples = storage.read_table(str(run / "ingest" / "examples.parquet"))
    sequences = storage.read_table(str(run / "ingest" / "sequences.parquet"))
    items = storage.read_table(str(run / "ingest" / "items.parquet")).sort_by("item_idx")
    item_ids = np.asarray(items["item_id"].to_pylist(), dtype=object)
    sft_model = load_model(str(run / "sft" / "model"))
    quality = None
    if (run / "label" / "quality.parquet").exists():
        from digr.evidence.label import load_quality

        quality = np.zeros(sft_model.n_items, np.float32)
        for i, q in load_quality(str(run / "label")).items():
            quality[i] = q
    splits = {s: test_rows(examples, sequences, s) for s in ("test", "valid")}
    ecfg = EvalConfig(batch_size=64)

    def evaluate(model_dir: str, tag: str) -> dict[str, dict[str, float]]:
        res = {}
        for split, rows in splits.items():
            ranked = rank_generative(rows, {"model_dir": model_dir, "trie_uri": str(run / "tokenize" / "trie.npz"),
                                            "beam_size": ecfg.beam_size, "top_k": ecfg.top_k,
                                            "exclude_seen": ecfg.exclude_seen, "max_history": base.max_history,
                                            "threads": 2}, ecfg)
            res[split] = score(ranked, rows["target"], ecfg.ks)
            if split == "test":
                buf = io.StringIO()
                write_predictions(buf, rows["user_id"], [[item_ids[i] for i in r if i != EMPTY] for r in ranked])
                (out / f"predictions_{tag}.jsonl").write_text(buf.getvalue())
        return res

    if not args.skip_quality:
        results: dict[str, list[dict[str, dict[str, float]]]] = {"sft": [evaluate(str(run / "sft" / "model"), "sft")]}
        variants = {"grpo_rule": dataclasses.replace(base, reward=dataclasses.replace(base.reward, qarm=0.0))}
        if quality is not None and (quality > 0).any():
            variants["grpo_qarm"] = dataclasses.replace(base, reward=dataclasses.replace(base.reward, qarm=0.5))
        else:
            print("\nno q_i for this catalogue (<run>/label/quality.parquet missing or all 0): the QARM variant "
                  "would equal the rule reward, so it is skipped")
        histories: dict[str, list] = {}
        for name, cfg in variants.items():
            results[name] = []
            for seed in args.seeds:
                t0 = time.time()
                res = run_grpo(examples, sft_model, dataclasses.replace(cfg, seed=seed), str(out / "ray"),
                               name=f"{name}-s{seed}", quality=quality)
                model_dir = str(out / f"{name}-s{seed}" / "model")
                save_model(res.model, model_dir)
                histories[f"{name}-s{seed}"] = res.history
                results[name].append(evaluate(model_dir, f"{name}-s{seed}"))
                print(f"{name} seed {seed}: {time.time() - t0:.0f} s, best step {res.best_step}, "
                      f"test ndcg@10 {results[name][-1]['test']['ndcg@10']:.4f}", flush=True)
        (out / "results.json").write_text(json.dumps({"results": results, "config": dataclasses.asdict(base),
                                                      "histories": histories}, indent=2, default=str))

        print(f"\nGRPO on {run} ({base.steps} steps, G={base.group_size}, {base.rollout} rollouts, lr {base.lr}, "
              f"beta {base.beta}); mean ± std over seeds {args.seeds} (SFT: one trained model)")
        for split in ("test", "valid"):
            print(f"\n{split} split")
            print("| model | " + " | ".join(METRICS) + " |")
            print("|---|" + "---|" * len(METRICS))
            for name, runs in results.items():
                cells = []
                for m in METRICS:
                    v = np.array([r[split][m] for r in runs])
                    cells.append(f"{v.mean():.4f}" + (f" ± {v.std():.4f}" if len(v) > 1 else ""))
                print(f"| {name} | " + " | ".join(cells) + " |")
        sft_test = results["sft"][0]["test"]["ndcg@10"]
        for name in variants:
            values = np.array([r["test"]["ndcg@10"] for r in results[name]])
            mean, std = float(values.mean()), float(values.std())
            # A gain smaller than 1e-4 (the table's last digit) or than the spread over seeds is noise.
            verdict = ("RAISED" if mean - sft_test > max(1e-4, std) else
                       "did NOT raise" if mean <= sft_test else "did not clearly raise (within noise)")
            print(f"{name}: test NDCG@10 {mean:.5f} ± {std:.5f} vs SFT {sft_test:.5f} ({mean - sft_test:+.5f}) "
                  f"-> GRPO {verdict} test NDCG@10")

        data_dir = manifest["config"]["ingest"]["path"]
        if not (SCORER.exists() and data_dir):  # score.py reads a ../shared/data dataset folder
            print(f"\nno independent check: {SCORER.name} needs the run's dataset folder "
                  f"(ingest.path {data_dir!r}; the embedded MovieLens default has none)")
        else:
            print(f"\nindependent check with {SCORER.name} (test split):")
            for tag in ["sft", *[f"{n}-s{s}" for n in variants for s in args.seeds]]:
                ours = (results["sft"][0] if tag == "sft" else
                        results[tag.rsplit("-s", 1)[0]][args.seeds.index(int(tag.rsplit("-s", 1)[1]))])["test"]
                proc = subprocess.run([sys.executable, str(SCORER), data_dir, str(out / f"predictions_{tag}.jsonl")],
                                      capture_output=True, text=True, check=True)
                theirs = json.loads(proc.stdout)
                ok = max(abs(theirs[k] - ours[k]) for k in METRICS) < 1e-4 and theirs["missing"] == 0
                print(f"  {tag:<14} score.py ndcg@10 {theirs['ndcg@10']:.5f} hr@10 {theirs['hr@10']:.5f} "
                      f"missing {theirs['missing']} -> {'agree' if ok else 'DISAGREE'}")

    if args.throughput_steps:
        print(f"\nthroughput ({args.throughput_steps} steps, batch {base.batch_size} x G {base.group_size}):")
        print("| trainer | workers | rollouts/s | rollout s/step | step s |")
        print("|---|---|---|---|---|")
        settings = (("all-reduce (gloo)", dataclasses.replace(base, steps=args.throughput_steps), (1, 2)),
                    ("DeepSpeed ZeRO-2", dataclasses.replace(base, steps=args.throughput_steps, strategy="deepspeed",
                                                             deepspeed=DeepSpeedSettings(zero_stage=2)), (1, 2)),
                    # disaggregated: 1 trainer, 2 rollout actors (1 thread each) that get the weights every step
                    ("all-reduce + 2 rollout workers", dataclasses.replace(base, steps=args.throughput_steps,
                                                                            rollout_workers=2, rollout_cpus=1.0), (1,)))
        for label, cfg, worker_counts in settings:
            for workers in worker_counts:
                scaled = dataclasses.replace(cfg, eval_every=10**6, checkpoint_every=10**6,
                                             threads_per_worker=1 if cfg.rollout_workers else 2 // workers,
                                             batch_size=base.batch_size // workers,
                                             scaling=ScalingConfig(num_workers=workers, cpus_per_worker=2 / workers))
                res = run_grpo(examples, sft_model, scaled, str(out / "ray"), name=f"tp-{cfg.strategy}-{workers}-{time.time_ns()}")
                h = res.history[1:] or res.history  # the first step pays for warm-up
                print(f"| {label} | {workers} | {workers * np.mean([r['rollouts_per_s'] for r in h]):.0f} | "
                      f"{np.mean([r['rollout_s'] for r in h]):.2f} | {np.mean([r['seconds'] for r in h]):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
