"""A node lost mid-stage, on a local multi-node Ray: the pipeline on a slice of Amazon Scientific,
once unfaulted and once per stage with the worker node that runs that stage's work killed
while it runs. Each faulted run must complete with the unfaulted run's row counts, metrics and
predictions, byte for byte.

    .venv/bin/python benchmarks/bench_faults.py [--stages embed sft evaluate] [--users 300]
        [--output DIR] [--keep]

The cluster (`ray.cluster_utils.Cluster`): a head with no CPUs (the driver, the object store
that holds what the driver puts, the GCS) and two worker nodes of 2 CPUs each. The killer
waits for the stage's "[stage] running" line and for its work to be placed (SFT: the Ray Train
worker and its first checkpoint, so the restart has one to resume from; embed: a Ray Data
embedding actor; evaluate: the SASRec task), then removes that node without a graceful
shutdown (its raylet and workers die at once): the stage finishes on the surviving node. A
fresh node is added before the next faulted run (from the main thread: Ray's node start sets
signal handlers). A faulted run starts from the reference's finished earlier stages (copied,
then skipped by their keys): the faulted stage and every stage after it run for real. What recovers it: Ray Train's FailureConfig (`*.scaling.max_failures`)
restarts the worker group from the latest checkpoint; Ray Data restarts a dead actor and
re-runs its lost blocks; a task's `max_retries` re-runs the SASRec task.

Ingest is not in the list: it runs in the driver process today (no Ray tasks), so a worker
node's loss cannot reach it.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "amazon-scientific"

# A slice every stage runs on in about a minute on 2 cores (tests/pipeline/test_pipeline.py's shape).
SLICE = [
    f"ingest.path={DATA}", "ingest.source=inter-json", "ingest.name=Scientific",
    "tokenize.rqvae.epochs=30", "tokenize.rqvae.codebook_size=32",
    "sft.epochs=6", "sft.batch_size=64", "sft.lr=0.003", "sft.warmup_steps=20", "sft.patience=6",
    "sft.eval_every=1", "sft.valid_users=200", "sft.model.d_model=32", "sft.model.d_kv=8",
    "sft.model.d_ff=64", "sft.model.num_heads=4", "sft.model.num_layers=1", "sft.model.num_decoder_layers=1",
    "sft.scaling.cpus_per_worker=2",
    "evaluate.sasrec.epochs=5", "evaluate.baselines=[popularity,sasrec]",
]
# What the killer waits for, per stage: Ray actor / task names (substrings) whose node it kills.
TARGETS = {"embed": ("actor", "MapBatches(TextEmbedder)"), "sft": ("actor", "RayTrainWorker"),
           "evaluate": ("task", "_train_and_rank_sasrec")}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _node_of(kind: str, name: str) -> str | None:
    """The node id of a live actor / running task whose name holds `name`, else None."""
    from ray.util import state

    if kind == "actor":
        rows = [a for a in state.list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
                if name in (a.class_name or "") or name in (a.name or "")]
    else:
        rows = [t for t in state.list_tasks(filters=[("state", "=", "RUNNING")], limit=1000) if name in (t.name or "")]
    return rows[0].node_id if rows else None


class Killer(threading.Thread):
    """Kills the worker node that runs `stage`'s work, once, while the stage runs; then adds a
    fresh node of the same size."""

    def __init__(self, cluster, stage: str, run_dir: Path) -> None:
        super().__init__(daemon=True)
        self.cluster, self.stage, self.run_dir = cluster, stage, run_dir
        self.started = threading.Event()
        self.done = threading.Event()
        self.report: dict = {}

    def log(self, line: str) -> None:
        print(line, flush=True)
        if line.startswith(f"[{self.stage}] running"):
            self.started.set()

    def _ready(self) -> bool:
        if self.stage == "sft":  # a checkpoint the controller has registered, so the restart resumes from it
            return any((self.run_dir / "sft").rglob("checkpoint_manager_snapshot.json"))
        return True

    def run(self) -> None:
        try:
            self._kill_once()
        except Exception as e:  # noqa: BLE001 - reported in the table; a thread's traceback would race the run's own
            self.report = {"error": f"{type(e).__name__}: {e}"}
        finally:
            self.done.set()

    def _kill_once(self) -> None:
        self.started.wait()
        kind, name = TARGETS[self.stage]
        t0 = time.time()
        while time.time() - t0 < 600:
            node_id = _node_of(kind, name) if self._ready() else None
            victim = next((n for n in self.cluster.worker_nodes if n.node_id == node_id), None)
            if victim is not None:
                self.cluster.remove_node(victim, allow_graceful=False)
                self.report = {"killed_after_s": round(time.time() - t0, 1), "node": node_id[:8]}
                print(f"*** killed node {node_id[:8]} ({name} on it), {self.report['killed_after_s']} s into "
                      f"[{self.stage}]", flush=True)
                break
            time.sleep(0.5)


def run_once(cluster, overrides: list[str], out: Path, stage: str | None,
             reference: Path | None = None) -> tuple[dict, float, dict]:
    """One pipeline run in `out`; with `stage`, the node running it is killed mid-stage. The
    stages before `stage` are copied from `reference` (their finished output, which the run
    then skips by key), so only the faulted stage and those after it run again."""
    from digr.pipeline.run import STAGES, PipelineConfig, run_pipeline
    from digr.platform.config import load

    cfg = load(PipelineConfig, None, overrides)
    if stage and reference:
        for earlier in STAGES[: STAGES.index(stage)]:
            if (reference / earlier).is_dir():
                shutil.copytree(reference / earlier, out / earlier, dirs_exist_ok=True)
    killer = Killer(cluster, stage, out) if stage else None
    if killer:
        killer.start()
    t0 = time.time()
    metrics = run_pipeline(cfg, str(out), log=killer.log if killer else print)
    report = killer.report if killer else {}
    if stage == "sft":  # what the restarted worker said (worker output stays in the session's logs)
        import ray

        logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
        said = [line for f in logs.glob("worker-*.out") for line in f.read_text(errors="replace").splitlines()
                if line.startswith("sft resuming after epoch") and f.stat().st_mtime >= t0]
        report["resumed"] = said[-1].removeprefix("sft resuming ") if said else "from scratch"
    return metrics, time.time() - t0, report


def compare(ref: Path, got: Path) -> dict[str, bool]:
    rows = lambda run: {s: v.get("rows") for s, v in json.loads((run / "manifest.json").read_text())["stages"].items()}
    preds = sorted(p.name for p in (ref / "evaluate").glob("predictions_*.jsonl"))
    return {"rows": rows(ref) == rows(got),
            "metrics": (ref / "metrics.json").read_text() == (got / "metrics.json").read_text(),
            "predictions": bool(preds) and all(filecmp.cmp(ref / "evaluate" / p, got / "evaluate" / p, shallow=False)
                                               for p in preds)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", nargs="+", choices=sorted(TARGETS), default=["embed", "sft", "evaluate"])
    ap.add_argument("--users", type=int, default=300)
    ap.add_argument("--output", default=None, help="default: a temp folder, removed unless --keep")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    if not (DATA / "Scientific.inter.json").exists():
        print(f"real data missing: {DATA}", file=sys.stderr)
        return 2

    import ray
    from ray.cluster_utils import Cluster

    # Ray Train's placement-group cleaner asks the State API whether a run's controller lives;
    # point every node's workers at this cluster's dashboard (see digr.pipeline.run.start_local_ray).
    port = _free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "0")
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port})
    for _ in range(2):
        cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    root = Path(args.output or tempfile.mkdtemp(prefix="bench-faults-"))
    overrides = [*SLICE, f"ingest.max_users={args.users}"]
    ok = True
    try:
        print("unfaulted run", flush=True)
        _, wall, _ = run_once(cluster, overrides, root / "reference", None)
        table = [("none", "-", wall, {"rows": True, "metrics": True, "predictions": True})]
        for stage in args.stages:
            print(f"\nrun with a node killed mid-{stage}", flush=True)
            out = root / f"kill-{stage}"
            _, wall, report = run_once(cluster, overrides, out, stage, root / "reference")
            same = compare(root / "reference", out)
            while len(cluster.worker_nodes) < 2:  # back to two workers for the next run
                cluster.add_node(num_cpus=2)
            cluster.wait_for_nodes()
            ok &= "killed_after_s" in report and all(same.values())
            when = (f"{report['killed_after_s']} s in" if "killed_after_s" in report
                    else report.get("error", "not killed"))
            if "resumed" in report:
                when += f"; the restart resumed {report['resumed']}"
            table.append((stage, when, wall, same))
        print("\n| node killed mid- | when | wall s | rows equal | metrics equal | predictions equal |")
        print("|---|---|---|---|---|---|")
        for stage, when, wall, same in table:
            print(f"| {stage} | {when} | {wall:.0f} | {same['rows']} | {same['metrics']} | {same['predictions']} |")
        print(f"\n{'PASS' if ok else 'FAIL'}: every faulted run completed with the unfaulted run's rows, metrics "
              "and predictions" if ok else "FAIL: a faulted run differs from the unfaulted one (or was not killed)")
    finally:
        ray.shutdown()
        cluster.shutdown()
        if not args.keep and not args.output:
            shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
