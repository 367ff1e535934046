"""The cluster definitions in cluster/ agree with the project: they parse, name the one Ray
version pyproject.toml pins, let GPU groups scale to zero, install extras that exist, and
run a job module that exists. Static checks only: no Ray is started."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any, Iterator

import pytest
import tomllib
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
AWS = CLUSTER / "aws.yaml"
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"

YAML_FILES = sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))
TEXT_FILES = YAML_FILES + sorted(CLUSTER.rglob("*.md"))

# rayproject/ray:2.58.0-py311-gpu, rayproject/ray-ml:2.9.3-gpu -> the version before the first "-"
IMAGE_TAG = re.compile(r"rayproject/ray(?:-ml|-llm)?:([A-Za-z0-9_.\-]+)")
RAY_PIN = re.compile(r"\bray(?:\[[^\]]*\])?\s*==\s*([0-9][0-9A-Za-z.]*)")
EXTRA_REF = re.compile(r"(?:\bdigr|\.)\[([A-Za-z0-9_,\- ]+)\]")
AWS_SECRET_NAMES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _ray_pin() -> str:
    pins = [m.group(1) for dep in _pyproject()["project"]["dependencies"]
            if (m := re.fullmatch(r"ray(?:\[[^\]]*\])?\s*==\s*(\S+)", dep.strip()))]
    assert len(pins) == 1, f"pyproject.toml must pin ray exactly once (ray[...]==X), found {pins}"
    return pins[0]


def _load(path: Path) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path.name}: expected one YAML document, got {len(docs)}"
    return docs[0]


def _walk(node: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair of nested dicts and lists."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def _kuberay_cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    return [("raycluster.yaml", _load(RAYCLUSTER)["spec"]),
            ("rayjob.yaml", _load(RAYJOB)["spec"]["rayClusterSpec"])]


def _containers(cluster_spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    groups = [("head", cluster_spec["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in cluster_spec.get("workerGroupSpecs", [])]
    return [(name, c) for name, g in groups for c in g["template"]["spec"]["containers"]]


def _gpu_limit(container: dict[str, Any]) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def _rayjob_runtime_env() -> dict[str, Any]:
    env = yaml.safe_load(_load(RAYJOB)["spec"]["runtimeEnvYAML"])
    assert isinstance(env, dict), "runtimeEnvYAML must hold a YAML mapping"
    return env


def test_cluster_files_present_and_parse() -> None:
    names = {p.relative_to(CLUSTER).as_posix() for p in YAML_FILES}
    assert {"aws.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml"} <= names
    for path in YAML_FILES:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), f"{path}: no YAML mapping"
    _rayjob_runtime_env()  # the embedded runtime env is YAML too


def test_aws_config_passes_ray_launcher_validation() -> None:
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _load(AWS)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    validate_config(prepare_config(cfg))  # what `ray up` runs before touching AWS


def test_every_ray_version_equals_pyproject_pin() -> None:
    pin = _ray_pin()
    found: dict[str, set[str]] = {}
    for path in TEXT_FILES:
        text = path.read_text()
        for tag in IMAGE_TAG.findall(text):
            found.setdefault(tag.split("-")[0], set()).add(f"{path.name}: image {tag}")
        for v in RAY_PIN.findall(text):
            found.setdefault(v, set()).add(f"{path.name}: ray=={v}")
    for path in YAML_FILES:
        for doc in yaml.safe_load_all(path.read_text()):
            for key, value in _walk(doc):
                if key == "rayVersion":
                    found.setdefault(str(value), set()).add(f"{path.name}: rayVersion {value}")
    assert pin in found, f"no cluster file mentions Ray {pin}"
    assert any("rayVersion" in w for w in found[pin]), "no rayVersion field found"
    assert any("image" in w for w in found[pin]), "no rayproject/ray image found"
    wrong = {v: sorted(w) for v, w in found.items() if v != pin}
    assert not wrong, f"Ray versions other than pyproject's {pin}: {wrong}"


def test_aws_gpu_workers_request_gpus_and_scale_to_zero() -> None:
    cfg = _load(AWS)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head.get("resources", {}).get("GPU", 0) == 0, "the head should not be a GPU node"
    gpu = {n: t for n, t in types.items() if t.get("resources", {}).get("GPU", 0) >= 1}
    assert gpu, "no node type declares GPU resources"
    for name, t in gpu.items():
        assert t["min_workers"] == 0, f"{name}: min_workers must be 0 to scale to zero"
        assert 0 < t["max_workers"] <= cfg["max_workers"], f"{name}: max_workers out of range"
        assert re.match(r"(g|p)\d", t["node_config"]["InstanceType"]), f"{name}: not a GPU instance"
    assert any(t.get("resources", {}).get("GPU", 0) == 0 and t.get("max_workers", 0) > 0
               for n, t in types.items() if n != cfg["head_node_type"]), "no CPU worker type"
    assert cfg["idle_timeout_minutes"] > 0


@pytest.mark.parametrize("name,spec", _kuberay_cluster_specs(), ids=["raycluster", "rayjob"])
def test_kuberay_gpu_groups_request_gpus_and_scale_to_zero(name: str, spec: dict[str, Any]) -> None:
    assert spec.get("enableInTreeAutoscaling") is True, f"{name}: autoscaling is off"
    head = spec["headGroupSpec"]["template"]["spec"]["containers"]
    assert all(_gpu_limit(c) == 0 for c in head), f"{name}: the head should not take a GPU"
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if any(_gpu_limit(c) >= 1 for c in g["template"]["spec"]["containers"])]
    assert gpu_groups, f"{name}: no worker group has an nvidia.com/gpu limit"
    for g in gpu_groups:
        assert g["minReplicas"] == 0, f"{name}/{g['groupName']}: minReplicas must be 0"
        assert g["maxReplicas"] > 0
        assert g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"]
        tolerated = {t.get("key") for t in g["template"]["spec"].get("tolerations", [])}
        assert "nvidia.com/gpu" in tolerated, f"{name}/{g['groupName']}: no GPU-taint toleration"
    assert any(all(_gpu_limit(c) == 0 for c in g["template"]["spec"]["containers"])
               for g in spec["workerGroupSpecs"]), f"{name}: no CPU worker group"


def test_rayjob_runs_on_the_raycluster_spec() -> None:
    job = _load(RAYJOB)
    assert job["apiVersion"] == _load(RAYCLUSTER)["apiVersion"] == "ray.io/v1"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["rayClusterSpec"] == _load(RAYCLUSTER)["spec"], \
        "rayjob.yaml's rayClusterSpec has drifted from raycluster.yaml's spec"


def test_rayjob_entrypoint_module_exists() -> None:
    argv = shlex.split(_load(RAYJOB)["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"], f"entrypoint should be `python -m jobs.<stage>`: {argv}"
    module = argv[2]
    assert module.startswith("jobs."), f"entrypoint module {module!r} is not under jobs/"
    rel = Path(*module.split("."))
    assert (REPO / rel.with_suffix(".py")).is_file() or (REPO / rel / "__main__.py").is_file(), \
        f"entrypoint module {module} has no file under {REPO / 'jobs'}"
    assert argv[argv.index("--output") + 1].startswith("s3://"), "cluster runs write to S3"


def test_rayjob_entrypoint_config_exists() -> None:
    argv = shlex.split(_load(RAYJOB)["spec"]["entrypoint"])
    config = argv[argv.index("--config") + 1]
    assert (REPO / config).is_file(), f"the RayJob runs --config {config}, which the repo lacks"


def test_rayjob_runtime_env_ships_the_project() -> None:
    from ray.runtime_env import RuntimeEnv

    env = _rayjob_runtime_env()
    RuntimeEnv(**env)  # Ray's own validation of the fields (URIs, pip spec)
    pip = env["pip"]["packages"] if isinstance(env["pip"], dict) else env["pip"]
    project = [p for p in pip if re.match(r"digr\[[^\]]*\bgpu\b[^\]]*\]\s*@", p)]
    assert project, f"the runtime env must install digr with its gpu extra: {pip}"
    assert project[0].split("@", 1)[1].strip() == env["working_dir"], \
        "pip and working_dir should name the same code archive"
    assert not any(re.match(r"ray\b", p) for p in pip), "the image provides Ray: don't pip it"


def test_referenced_extras_are_defined_in_pyproject() -> None:
    extras = set(_pyproject()["project"].get("optional-dependencies", {}))
    used = {(p.name, e.strip()) for p in TEXT_FILES
            for group in EXTRA_REF.findall(p.read_text()) for e in group.split(",")}
    assert any(e == "gpu" for _, e in used), "no cluster file installs the gpu extra"
    missing = sorted(f"{f}: [{e}]" for f, e in used if e not in extras)
    # pip only warns about an unknown extra and installs without it: vLLM would be missing.
    assert not missing, f"extras not in pyproject's optional-dependencies {sorted(extras)}: {missing}"


def test_aws_setup_commands_match_the_hardware() -> None:
    cfg = _load(AWS)
    setup_pin = re.search(r'torch==([0-9][^"\s]*)', (REPO / "scripts" / "setup.sh").read_text())
    assert setup_pin, "scripts/setup.sh should pin torch"
    types = cfg["available_node_types"]
    for name, t in types.items():
        cmds = (cfg["head_setup_commands"] if name == cfg["head_node_type"]
                else t.get("worker_setup_commands", cfg.get("worker_setup_commands", [])))
        cmds = "\n".join(cfg.get("setup_commands", []) + cmds)
        assert re.search(r"pip install .*-e ", cmds), f"{name}: the project is not installed"
        if t.get("resources", {}).get("GPU", 0) >= 1:
            assert re.search(r"""-e ["']?\.\[gpu\]""", cmds), f"{name}: GPU nodes need .[gpu]"
            assert "torch==" not in cmds, f"{name}: vLLM pins its own CUDA torch"
        else:
            assert f"torch=={setup_pin.group(1)}" in cmds, \
                f"{name}: CPU nodes install torch=={setup_pin.group(1)} first, as setup.sh does"
            assert "download.pytorch.org/whl/cpu" in cmds, f"{name}: torch must be the CPU build"
            assert "[gpu]" not in cmds, f"{name}: CPU nodes skip the gpu extra"


def test_aws_credentials_never_inline() -> None:
    for path in TEXT_FILES:
        text = path.read_text()
        assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), f"{path.name}: an AWS key id"
    for name, spec in _kuberay_cluster_specs():
        for group, c in _containers(spec):
            env = {e["name"]: e for e in c.get("env", [])}
            assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env), \
                f"{name}/{group}: S3 credentials missing (the driver and workers write to S3)"
            for key in AWS_SECRET_NAMES & set(env):
                assert "value" not in env[key], f"{name}/{group}: {key} is inline"
                assert "secretKeyRef" in env[key].get("valueFrom", {}), \
                    f"{name}/{group}: {key} must come from a secret"


def test_rayservice_pods_all_run_serve_in_the_same_throughput_mode() -> None:
    """Serve's high-throughput flags are read per process at start-up: a pod without them would
    run another data path (or no HAProxy) than the rest of the cluster."""
    spec = _load(CLUSTER / "kuberay" / "rayservice.yaml")["spec"]["rayClusterConfig"]
    flags = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
    for name, container in _containers(spec):
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert {k: env.get(k) for k in flags} == flags, f"rayservice.yaml {name}: {env}"


def test_rayservice_keeps_serving_through_a_head_loss() -> None:
    """GCS fault tolerance on the serving cluster: an external Redis holds the GCS tables."""
    spec = _load(CLUSTER / "kuberay" / "rayservice.yaml")["spec"]["rayClusterConfig"]
    ft = spec.get("gcsFaultToleranceOptions", {})
    assert ft.get("redisAddress", "").startswith("redis://"), "rayservice.yaml: no GCS fault tolerance"
    assert "secretKeyRef" in ft.get("redisPassword", {}).get("valueFrom", {}), "the Redis password belongs in a secret"
