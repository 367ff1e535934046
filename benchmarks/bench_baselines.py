"""RecBole 1.2.1's SASRec next to our SASRec (digr.eval.baselines) on exactly the same split.

    bash scripts/setup-recbole.sh      # once: .venv-recbole with recbole==1.2.1 and torch 2.13.0
    .venv/bin/python benchmarks/bench_baselines.py --dataset {ml100k,scientific} [--seeds 0 1 2]
        [--output DIR] [--threads N] [--epochs N] [key=value ...]

1. Our ingest, with the dataset's config, gives the leave-last-out split.
2. Its sequences become a RecBole atomic file (user_id, item_id, timestamp = position in the user's
   sequence); RecBole's own leave-one-out (`LS: valid_and_test`, order TO, no inter-num filtering)
   must then hold out the same valid and test targets and the same number of training examples:
   the script asserts that for every user.
3. RecBole's SASRec (its 1.2.1 defaults plus CE loss, no negative sampling, lr 1e-3, batch 256,
   MAX_ITEM_LIST_LENGTH 20, at most 300 epochs, early stop after 10 evaluations on valid NDCG@10)
   trains in .venv-recbole in a subprocess; the runner writes its test top-10 with each user's
   history items excluded (as ours are), and prints RecBole's own evaluator figures (which, for
   sequential models, do not exclude history items).
4. Our SASRec trains and ranks exactly as the evaluate stage does (digr.eval.evaluate), with
   the SASRecConfig defaults (RecBole's settings; `evaluate.sasrec.<field>=...` overrides apply,
   the dataset yaml's evaluate.sasrec does not), on one process, no Ray.
5. One table per model x seed, mean ± std over seeds, the ratio ours / RecBole, and
   ../shared/tools/score.py's figures for every predictions file (they must agree).

Target: ours within ±3% of RecBole's test NDCG@10 (mean over seeds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SCORER = SHARED / "tools" / "score.py"
SCIENTIFIC = SHARED / "data" / "amazon-scientific"
RECBOLE_PY = REPO / ".venv-recbole" / "bin" / "python"
DATASETS = {
    "ml100k": (REPO / "configs" / "ml100k.yaml", []),
    "scientific": (REPO / "configs" / "scientific.yaml", [f"ingest.path={SCIENTIFIC}"]),
}
TOLERANCE = 0.03  # ours within ±3% of RecBole's test NDCG@10

# RecBole 1.2.1 SASRec defaults (properties/model/SASRec.yaml, overall.yaml) plus the settings.
RECBOLE_PARAMS = {
    "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
    "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
    "user_inter_num_interval": "[0,inf)", "item_inter_num_interval": "[0,inf)",
    "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
    "loss_type": "CE", "train_neg_sample_args": None,
    "n_layers": 2, "n_heads": 2, "hidden_size": 64, "inner_size": 256,
    "hidden_dropout_prob": 0.5, "attn_dropout_prob": 0.5, "hidden_act": "gelu",
    "layer_norm_eps": 1e-12, "initializer_range": 0.02,
    "learner": "adam", "learning_rate": 1e-3, "weight_decay": 0.0, "train_batch_size": 256,
    "MAX_ITEM_LIST_LENGTH": 20, "epochs": 300, "eval_step": 1, "stopping_step": 10,
    "valid_metric": "NDCG@10", "metrics": ["Hit", "NDCG"], "topk": [5, 10], "eval_batch_size": 8192,
    "use_gpu": False, "gpu_id": "", "reproducibility": True, "show_progress": False,
    "save_dataset": False, "save_dataloaders": False, "log_wandb": False, "state": "INFO",
}

# Runs inside .venv-recbole; written next to the run's outputs. argv[1]: a JSON job file.
RUNNER = r'''
import json, math, sys, time
job = json.load(open(sys.argv[1]))
sys.argv = sys.argv[:1]  # RecBole's Config parses --key=value from the command line
import numpy as np
import torch

# torch >= 2.6 defaults torch.load to weights_only=True; RecBole 1.2.1's checkpoints pickle its
# Config object, so loading the best model (Trainer.evaluate(load_best_model=True)) fails without this.
_torch_load = torch.load
def _load(*a, **k):
    k.setdefault("weights_only", False)
    return _torch_load(*a, **k)
torch.load = _load

from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.model.sequential_recommender import SASRec
from recbole.trainer import Trainer
from recbole.utils import init_logger, init_seed

torch.set_num_threads(job["threads"])
params = dict(job["params"], data_path=job["data_path"], seed=job["seed"], checkpoint_dir=job["out"] + "/saved")
config = Config(model="SASRec", dataset=job["dataset"], config_dict=params)
init_seed(config["seed"], config["reproducibility"])
init_logger(config)
dataset = create_dataset(config)
train_data, valid_data, test_data = data_preparation(config, dataset)
init_seed(config["seed"], config["reproducibility"])
model = SASRec(config, train_data._dataset).to(config["device"])
trainer = Trainer(config, model)
best = {"epoch": None}
_save = trainer._save_checkpoint
def _save_and_note(epoch, *a, **k):  # called on every new best valid score
    best["epoch"] = epoch + 1  # 1-based, as ours
    return _save(epoch, *a, **k)
trainer._save_checkpoint = _save_and_note
t0 = time.perf_counter()
best_valid, _ = trainer.fit(train_data, valid_data, saved=True, show_progress=False, verbose=True)
fit_s = time.perf_counter() - t0
own_test = trainer.evaluate(test_data, load_best_model=True, show_progress=False)  # model now holds the best weights

ds = test_data._dataset
uid_f, iid_f = ds.uid_field, ds.iid_field
seqs = {}  # user token -> item tokens in timestamp order, for the history exclusion
with open(job["inter_file"]) as f:
    next(f)
    for line in f:
        u, i, t = line.rstrip("\n").split("\t")
        seqs.setdefault(u, []).append((float(t), i))
seqs = {u: [i for _, i in sorted(v)] for u, v in seqs.items()}

def targets(loader):
    out = {}
    for inter, _, _, _ in loader:
        for u, i in zip(ds.id2token(uid_f, inter[uid_f].numpy()), ds.id2token(iid_f, inter[iid_f].numpy())):
            assert u not in out, f"user {u} twice"
            out[str(u)] = str(i)
    return out

model.eval()
preds, hr, ndcg, n = [], 0.0, 0.0, 0
t1 = time.perf_counter()
with torch.no_grad():
    for inter, _, _, _ in test_data:
        scores = model.full_sort_predict(inter)  # (B, n_items + 1); column 0 is the padding item
        scores[:, 0] = -math.inf
        users = ds.id2token(uid_f, inter[uid_f].numpy())
        tgts = inter[iid_f].numpy()
        for r, u in enumerate(users):
            seen = seqs[u][:-1]  # every item before the test target, as ours
            scores[r, torch.as_tensor(ds.token2id(iid_f, seen))] = -math.inf
        top = scores.topk(10, dim=1).indices.numpy()
        for r, u in enumerate(users):
            items = [str(x) for x in ds.id2token(iid_f, top[r])]
            preds.append({"user": str(u), "items": items})
            hit = np.flatnonzero(top[r] == tgts[r])
            n += 1
            if len(hit):
                hr += 1.0
                ndcg += 1.0 / math.log2(hit[0] + 2)
rank_s = time.perf_counter() - t1
with open(job["out"] + "/predictions.jsonl", "w") as f:
    f.writelines(json.dumps(p) + "\n" for p in preds)
result = {
    "seed": job["seed"], "best_epoch": best["epoch"], "epochs_run": len(trainer.train_loss_dict),
    "best_valid_ndcg@10_recbole": float(best_valid), "fit_s": fit_s, "rank_s": rank_s,
    "recbole_own_test": {k: float(v) for k, v in own_test.items()},
    "test": {"hr@10": hr / n, "ndcg@10": ndcg / n},
    "n_items": int(ds.item_num - 1), "n_train_examples": len(train_data._dataset),
    "valid_targets": targets(valid_data), "test_targets": targets(test_data),
}
json.dump(result, open(job["out"] + "/result.json", "w"))
print(f"RECBOLE own evaluator (no history exclusion) test: " + " ".join(f"{k} {v:.4f}" for k, v in own_test.items()))
print(f"RECBOLE history-excluded test: hr@10 {hr / n:.4f} ndcg@10 {ndcg / n:.4f}; best epoch {best['epoch']}, "
      f"{len(trainer.train_loss_dict)} epochs, fit {fit_s:.0f}s")
'''


def log(msg: str) -> None:
    print(msg, flush=True)


def build_split(dataset: str, overrides: list[str]):
    from digr.data.ingest import ingest
    from digr.eval.evaluate import test_rows
    from digr.pipeline.run import PipelineConfig
    from digr.platform.config import load

    path, extra = DATASETS[dataset]
    cfg = load(PipelineConfig, str(path), [*extra, *overrides])
    # Ours runs with the SASRecConfig defaults (RecBole's settings), not the dataset yaml's
    # evaluate.sasrec (configs/ml100k.yaml pins a fast in-house recipe for the main job's time
    # budget); `evaluate.sasrec.<field>=...` overrides on the command line still apply.
    from digr.eval.baselines import SASRecConfig
    sas = load(SASRecConfig, None, [o.removeprefix("evaluate.sasrec.") for o in overrides
                                    if o.startswith("evaluate.sasrec.")])
    cfg = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, sasrec=sas))
    res = ingest(cfg.ingest)
    items = res.items.sort_by("item_idx")
    item_ids = items["item_id"].to_pylist()
    users = res.sequences["user_id"].to_pylist()
    seqs = res.sequences["item_idx"].to_pylist()
    test = test_rows(res.examples, res.sequences, "test")
    valid = test_rows(res.examples, res.sequences, "valid")
    n_train = int(np.sum(np.asarray(res.examples["split"].to_pylist()) == "train"))
    return cfg, item_ids, users, seqs, test, valid, n_train


def write_atomic(folder: Path, name: str, users: list[str], seqs: list[list[int]], item_ids: list[str],
                 keep: set[str]) -> Path:
    """<folder>/<name>/<name>.inter: one row per interaction, timestamp = position in the sequence."""
    (folder / name).mkdir(parents=True, exist_ok=True)
    path = folder / name / f"{name}.inter"
    with open(path, "w") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for u, s in zip(users, seqs):
            if u in keep:
                for t, i in enumerate(s):
                    f.write(f"{u}\t{item_ids[i]}\t{t}\n")
    return path


def run_recbole(out: Path, atomic_dir: Path, name: str, inter_file: Path, seed: int, threads: int,
                epochs: int | None) -> dict:
    run_dir = out / f"recbole-seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "runner.py").write_text(RUNNER)
    params = dict(RECBOLE_PARAMS, **({"epochs": epochs} if epochs else {}))
    job = {"params": params, "data_path": str(atomic_dir), "dataset": name, "inter_file": str(inter_file),
           "seed": seed, "threads": threads, "out": str(run_dir)}
    (run_dir / "job.json").write_text(json.dumps(job, indent=1))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    with open(run_dir / "recbole.log", "w") as logf:
        proc = subprocess.Popen([str(RECBOLE_PY), "runner.py", "job.json"], cwd=run_dir, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:  # type: ignore[union-attr]
            logf.write(line)
            if "evaluating" in line or "RECBOLE" in line or "Error" in line or "Traceback" in line \
                    or "Finished" in line or "training [time" in line:
                log(f"  [recbole seed {seed}] {line.rstrip()}")
        rc = proc.wait()
    if rc:
        raise SystemExit(f"RecBole runner failed (rc {rc}); see {run_dir / 'recbole.log'}")
    result = json.loads((run_dir / "result.json").read_text())
    result["wall_s"] = time.perf_counter() - t0
    result["predictions"] = str(run_dir / "predictions.jsonl")
    return result


def run_ours(out: Path, cfg, item_ids: list[str], seqs: list[list[int]], test: dict, seed: int,
             threads: int, epochs: int | None) -> dict:
    import torch

    from digr.data.metrics import EMPTY, hr_ndcg, write_predictions
    from digr.eval.baselines import sasrec_rank, seen_mask, train_sasrec

    torch.set_num_threads(threads)
    sas = dataclasses.replace(cfg.evaluate.sasrec, seed=seed, **({"epochs": epochs} if epochs else {}))
    n_items = len(item_ids)
    t0 = time.perf_counter()
    model, history = train_sasrec(seqs, n_items, sas, log=lambda m: log(f"  [ours seed {seed}] {m}"))
    fit_s = time.perf_counter() - t0
    # As digr.eval.evaluate._train_and_rank_sasrec: the whole prior sequence, exclusion of seen items.
    exclude = seen_mask(test["seen"], n_items) if cfg.evaluate.exclude_seen else None
    ranked = sasrec_rank(model, test["seen"], cfg.evaluate.top_k, exclude)
    wall = time.perf_counter() - t0
    metrics = hr_ndcg(ranked, test["target"], ks=(5, 10))
    best = max(history, key=lambda r: r["ndcg@10"])  # first of equals: the one train_sasrec kept
    path = out / f"ours-seed{seed}" / "predictions.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_predictions(path, test["user_id"], [[item_ids[i] for i in row if i != EMPTY] for row in ranked])
    (path.parent / "history.json").write_text(json.dumps(history))
    return {"seed": seed, "best_epoch": best["epoch"], "epochs_run": history[-1]["epoch"], "fit_s": fit_s,
            "wall_s": wall, "test": {"hr@10": metrics["hr@10"], "ndcg@10": metrics["ndcg@10"]},
            "config": dataclasses.asdict(sas), "predictions": str(path)}


def score(dataset_dir: Path, predictions: str) -> dict:
    out = subprocess.run([sys.executable, str(SCORER), str(dataset_dir), predictions],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--output", default=None, help="default: runs/bench-baselines-<dataset>")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for each model (same for both)")
    ap.add_argument("--epochs", type=int, default=None, help="cap both models' epochs (smoke tests only)")
    ap.add_argument("--models", nargs="+", default=["recbole-sasrec", "ours-sasrec"],
                    choices=["recbole-sasrec", "ours-sasrec"])
    ap.add_argument("overrides", nargs="*", help="PipelineConfig key=value, e.g. evaluate.sasrec.max_len=20")
    args = ap.parse_args()
    out = Path(args.output or REPO / "runs" / f"bench-baselines-{args.dataset}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    if "recbole-sasrec" in args.models and not RECBOLE_PY.exists():
        raise SystemExit(f"{RECBOLE_PY} missing: run bash scripts/setup-recbole.sh first")

    # a. the split
    t0 = time.perf_counter()
    cfg, item_ids, users, seqs, test, valid, n_train = build_split(args.dataset, args.overrides)
    ours_test = {u: item_ids[t] for u, t in zip(test["user_id"], test["target"])}
    ours_valid = {u: item_ids[t] for u, t in zip(valid["user_id"], valid["target"])}
    log(f"split: {len(users)} users, {len(ours_test)} with test targets, {len(item_ids)} items, "
        f"{sum(map(len, seqs))} interactions, {n_train} train examples ({time.perf_counter() - t0:.1f}s)")

    # b. RecBole atomic files, and a scorer folder
    name = f"bench_{args.dataset}"
    inter_file = write_atomic(out / "recbole-data", name, users, seqs, item_ids, set(ours_test))
    if args.dataset == "scientific":
        score_dir = SCIENTIFIC  # the dataset's own file: score.py also checks our split against it
    else:  # ml100k has no inter.json: our ingest's sequences with source item ids
        score_dir = out / "inter-json"
        score_dir.mkdir(exist_ok=True)
        (score_dir / "ml100k.inter.json").write_text(json.dumps(
            {u: [item_ids[i] for i in s] for u, s in zip(users, seqs) if u in ours_test}))
    log(f"atomic file {inter_file}; scorer dataset dir {score_dir}")

    results: dict[str, list[dict]] = {m: [] for m in args.models}
    for seed in args.seeds:
        if "recbole-sasrec" in args.models:
            log(f"\n== recbole-sasrec seed {seed} ==")
            r = run_recbole(out, out / "recbole-data", name, inter_file, seed, args.threads, args.epochs)
            # c. the split check: RecBole's held-out targets must be ours, user by user
            assert r["test_targets"] == ours_test, "RecBole's test targets differ from ours: " + str(
                [(u, r["test_targets"].get(u), t) for u, t in ours_test.items() if r["test_targets"].get(u) != t][:5])
            assert r["valid_targets"] == ours_valid, "RecBole's valid targets differ from ours"
            assert r["n_train_examples"] == n_train, f"RecBole train examples {r['n_train_examples']} != ours {n_train}"
            assert r["n_items"] == len(item_ids), f"RecBole items {r['n_items']} != ours {len(item_ids)}"
            log(f"split check: test targets identical for all {len(ours_test)} users, valid targets for all "
                f"{len(ours_valid)}, train examples {n_train} = {r['n_train_examples']}, items {r['n_items']}")
            r.pop("test_targets"), r.pop("valid_targets")
            results["recbole-sasrec"].append(r)
        if "ours-sasrec" in args.models:
            log(f"\n== ours-sasrec seed {seed} ==")
            results["ours-sasrec"].append(run_ours(out, cfg, item_ids, seqs, test, seed, args.threads, args.epochs))

    # e. the table, with score.py's figures for every predictions file
    agree = True
    lines = [f"\n{args.dataset}: test, full catalogue, history items excluded; {len(ours_test)} users, "
             f"torch threads {args.threads}",
             f"{'model':<15}{'seed':>5}{'HR@10':>9}{'NDCG@10':>9}{'best ep':>8}{'epochs':>7}{'wall s':>8}"
             f"{'score.py HR@10':>16}{'NDCG@10':>9}  agree"]
    for model, rs in results.items():
        for r in rs:
            s = score(score_dir, r["predictions"])
            r["score_py"] = s
            ok = (abs(s["hr@10"] - r["test"]["hr@10"]) < 1e-4 and abs(s["ndcg@10"] - r["test"]["ndcg@10"]) < 1e-4
                  and s["missing"] == 0 and s["unknown_users"] == 0 and s["lists_with_duplicates"] == 0)
            agree &= ok
            lines.append(f"{model:<15}{r['seed']:>5}{r['test']['hr@10']:>9.4f}{r['test']['ndcg@10']:>9.4f}"
                         f"{r['best_epoch']:>8}{r['epochs_run']:>7}{r['wall_s']:>8.0f}"
                         f"{s['hr@10']:>16.4f}{s['ndcg@10']:>9.4f}  {'yes' if ok else 'NO'}")
    summary: dict[str, dict] = {}
    lines.append("")
    for model, rs in results.items():
        if not rs:
            continue
        hr, nd = mean_std([r["test"]["hr@10"] for r in rs]), mean_std([r["test"]["ndcg@10"] for r in rs])
        wall = mean_std([r["wall_s"] for r in rs])
        summary[model] = {"hr@10": hr, "ndcg@10": nd, "wall_s": wall, "seeds": [r["seed"] for r in rs]}
        lines.append(f"{model:<15} mean±std over {len(rs)} seed(s): HR@10 {hr[0]:.4f} ± {hr[1]:.4f}  "
                     f"NDCG@10 {nd[0]:.4f} ± {nd[1]:.4f}  wall {wall[0]:.0f} ± {wall[1]:.0f} s")
    for r in results.get("recbole-sasrec", []):
        own = r["recbole_own_test"]
        lines.append(f"recbole own evaluator, seed {r['seed']} (history NOT excluded): "
                     + " ".join(f"{k} {v:.4f}" for k, v in own.items()))
    verdict = None
    if len(summary) == 2:
        ratio_nd = summary["ours-sasrec"]["ndcg@10"][0] / summary["recbole-sasrec"]["ndcg@10"][0]
        ratio_hr = summary["ours-sasrec"]["hr@10"][0] / summary["recbole-sasrec"]["hr@10"][0]
        verdict = abs(ratio_nd - 1) <= TOLERANCE
        lines.append(f"ratio ours/recbole: NDCG@10 {ratio_nd:.3f}  HR@10 {ratio_hr:.3f}  -> "
                     f"{'WITHIN' if verdict else 'OUTSIDE'} ±{TOLERANCE:.0%} on NDCG@10")
    lines.append(f"score.py agrees with every printed figure: {'yes' if agree else 'NO'}")
    print("\n".join(lines), flush=True)
    (out / "summary.json").write_text(json.dumps(
        {"dataset": args.dataset, "seeds": args.seeds, "threads": args.threads, "overrides": args.overrides,
         "summary": summary, "runs": results, "within_tolerance": verdict, "score_py_agrees": agree}, indent=1))
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
