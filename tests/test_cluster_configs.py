"""The cluster configurations in cluster_configs/ are accepted by the tools that will read them.

Ray cluster launcher YAMLs (local.yaml, aws.yaml, gcp.yaml) go through Ray's own code, the way
`ray up` reads them: ``prepare_config`` (merge with the provider's defaults, on-premise node type,
per-type worker bounds) and ``validate_config`` (Ray's ``ray-schema.json`` plus its head-type and
min/max-workers checks). The on-premise config also goes through the whole of ``ray up``'s bootstrap
(``_bootstrap_config``: provider lookup and provider bootstrap), which for the local provider touches
no network. The AWS and GCP bootstraps call the cloud APIs with credentials (and need boto3 /
google-api-python-client), so for those only Ray's preparation and schema validation run here.

KubeRay manifests (kuberay/raycluster.yaml, kuberay/rayjob.yaml) are checked for what the KubeRay
operator requires of them (apiVersion ray.io/v1, names, string-valued rayStartParams, containers with
name and image, worker-group replica bounds, resource requests within limits), and are also read by
Ray's own KubeRay autoscaler code, which derives an autoscaling config from a RayCluster spec and
validates it. The RayJob's entrypoint must be a valid `bilevel-ray run` command on a config of
configs/ that loads.

Everything is offline and reads files only; nothing is started or contacted.
"""

from __future__ import annotations

import copy
import ipaddress
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.commands import _bootstrap_config
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.kuberay.utils import parse_quantity
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_CONFIGS = REPO / "cluster_configs"
KUBERAY = CLUSTER_CONFIGS / "kuberay"
LAUNCHERS = {"local.yaml": "local", "aws.yaml": "aws", "gcp.yaml": "gcp"}
VENV_RAY = "~/bilevel-ray/.venv/bin/ray"
IMAGE = "bilevel-ray:latest"
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{path}: not a mapping"
    return data


def _ray_up_config(raw: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` makes of a launcher config before talking to the provider: defaults merged,
    then Ray's validation (raises jsonschema.ValidationError or ValueError)."""
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    return prepared


def _launcher(name: str) -> dict[str, Any]:
    return _load(CLUSTER_CONFIGS / name)


# ---------------------------------------------------------------------------------------------------
# Ray cluster launcher


@pytest.mark.parametrize("name", list(LAUNCHERS))
def test_launcher_config_passes_ray_validation(name):
    raw = _launcher(name)
    config = _ray_up_config(raw)
    assert config["provider"]["type"] == LAUNCHERS[name]
    assert config["cluster_name"].startswith("bilevel-ray")
    if LAUNCHERS[name] == "local":  # the whole `ray up` bootstrap: no credentials, no network
        config = _bootstrap_config(copy.deepcopy(raw), no_config_cache=True)
        validate_config(config)

    # worker bounds as the autoscaler will use them
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    if LAUNCHERS[name] == "local":  # a single node type that is head and workers at once
        workers = config["available_node_types"]
    assert workers, "no worker node type"
    for node_type in workers.values():
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"]
    assert config["max_workers"] >= 1
    assert sum(t["min_workers"] for t in workers.values()) <= config["max_workers"]


@pytest.mark.parametrize("name", list(LAUNCHERS))
def test_launcher_config_installs_and_starts_the_project(name):
    config = _ray_up_config(_launcher(name))

    # the repository is copied to ~/bilevel-ray from the directory `ray up` runs in (the repo root)
    assert set(config["file_mounts"]) == {"~/bilevel-ray"}
    local = (REPO / config["file_mounts"]["~/bilevel-ray"]).resolve()
    assert local == REPO and (local / "scripts" / "setup.sh").is_file() and (local / "pyproject.toml").is_file()
    assert {".venv", ".git", "runs"} <= set(config["rsync_exclude"])

    # after prepare_config, setup_commands are merged into the head's and the workers' commands
    for commands in (config["head_setup_commands"], config["worker_setup_commands"]):
        assert any("bash ~/bilevel-ray/scripts/setup.sh" in c for c in commands), commands

    head = " ".join(config["head_start_ray_commands"])
    worker = " ".join(config["worker_start_ray_commands"])
    assert f"{VENV_RAY} stop" in head and f"{VENV_RAY} stop" in worker
    assert f"{VENV_RAY} start --head" in head
    for flag in ("--port=6379", "--autoscaling-config=~/ray_bootstrap_config.yaml",
                 "--dashboard-host=0.0.0.0", "--ray-client-server-port=10001"):
        assert flag in head, flag
    assert f"{VENV_RAY} start --address=$RAY_HEAD_IP:6379" in worker
    assert "--head" not in worker


@pytest.mark.parametrize("name", list(LAUNCHERS))
def test_launcher_config_sets_cpu_resources(name):
    raw = _launcher(name)
    config = _ray_up_config(raw)
    if LAUNCHERS[name] == "local":
        # on-premise node types cannot carry resources: the CPU count is a ray start flag
        for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
            cpus = re.findall(r"--num-cpus=(\d+)", " ".join(commands))
            assert len(cpus) == 1 and int(cpus[0]) > 0, commands
        provider = raw["provider"]
        ips = [ipaddress.ip_address(a) for a in (provider["head_ip"], *provider["worker_ips"])]
        assert len(set(ips)) == len(ips) and len(provider["worker_ips"]) == raw["min_workers"]
    else:
        # stated, so the autoscaler needs no cloud API call to learn them
        for node_type in config["available_node_types"].values():
            assert isinstance(node_type["resources"].get("CPU"), int) and node_type["resources"]["CPU"] > 0
            assert not node_type["resources"].get("GPU")


def _set(path: str, value):
    def mutate(config):
        *parents, leaf = path.split(".")
        for key in parents:
            config = config[key]
        config[leaf] = value
    return mutate


def _drop(path: str):
    def mutate(config):
        *parents, leaf = path.split(".")
        for key in parents:
            config = config[key]
        del config[leaf]
    return mutate


@pytest.mark.parametrize("mutate, error, match", [
    (_set("max_workers", "4"), jsonschema.ValidationError, "is not of type 'integer'"),
    (_set("max_worker", 4), jsonschema.ValidationError, "Additional properties are not allowed"),
    (_set("available_node_types.cpu_worker.min_workers", 2.5), jsonschema.ValidationError, "integer"),
    (_drop("available_node_types.cpu_worker.resources"), jsonschema.ValidationError, "'resources' is a required"),
    (_set("available_node_types.cpu_worker.resources", {"CPU": -8}), jsonschema.ValidationError, "minimum"),
    (_set("head_node_type", "no_such_type"), ValueError, "head_node_type"),
    (_set("available_node_types.cpu_worker.min_workers", 9), ValueError, "max_workers"),
], ids=["max_workers-string", "unknown-key", "min_workers-float", "no-resources", "negative-cpu",
        "unknown-head-type", "min-above-max"])
def test_ray_rejects_a_broken_launcher_config(mutate, error, match):
    raw = _launcher("aws.yaml")
    _ray_up_config(raw)  # the unbroken config passes
    mutate(raw)
    with pytest.raises(error, match=match):
        _ray_up_config(raw)


def test_ray_rejects_a_launcher_config_without_provider():
    config = _ray_up_config(_launcher("aws.yaml"))
    del config["provider"]
    with pytest.raises(jsonschema.ValidationError, match="'provider' is a required property"):
        validate_config(config)


# ---------------------------------------------------------------------------------------------------
# KubeRay


def _quantity_problems(where: str, resources: dict[str, Any]) -> list[str]:
    problems = []
    requests, limits = resources.get("requests", {}), resources.get("limits", {})
    for kind in ("cpu", "memory"):
        if kind not in limits:
            problems.append(f"{where}: no {kind} limit")
    for kind, request in requests.items():
        if kind in limits and parse_quantity(request) > parse_quantity(limits[kind]):
            problems.append(f"{where}: {kind} request {request} above its limit {limits[kind]}")
    return problems


def _group_problems(where: str, group: dict[str, Any]) -> list[str]:
    problems = []
    params = group.get("rayStartParams")
    if not isinstance(params, dict):
        problems.append(f"{where}.rayStartParams: must be a mapping")
        params = {}
    for key, value in params.items():
        if not isinstance(key, str) or not isinstance(value, str):
            problems.append(f"{where}.rayStartParams.{key}: {value!r} must be a string (quote it)")
    containers = (((group.get("template") or {}).get("spec") or {}).get("containers"))
    if not isinstance(containers, list) or not containers:
        return problems + [f"{where}.template.spec.containers: must be a non-empty list"]
    for i, container in enumerate(containers):
        name, image = container.get("name"), container.get("image")
        if not isinstance(name, str) or not DNS_LABEL.match(name):
            problems.append(f"{where}.containers[{i}].name: {name!r} is not a DNS label")
        if not isinstance(image, str) or not image:
            problems.append(f"{where}.containers[{i}].image: missing")
        problems += _quantity_problems(f"{where}.containers[{i}].resources", container.get("resources") or {})
    # the Ray container is the first one; an explicit num-cpus must agree with its CPU limit
    limits = (containers[0].get("resources") or {}).get("limits", {})
    if "num-cpus" in params and "cpu" in limits and isinstance(params["num-cpus"], str):
        if parse_quantity(params["num-cpus"]) != parse_quantity(limits["cpu"]):
            problems.append(f"{where}: num-cpus {params['num-cpus']} differs from the cpu limit {limits['cpu']}")
    return problems


def kuberay_cluster_problems(spec: dict[str, Any], where: str = "spec") -> list[str]:
    """What the KubeRay operator would refuse (or mis-read) in a RayCluster spec."""
    problems = []
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        return [f"{where}.headGroupSpec: missing"]
    problems += _group_problems(f"{where}.headGroupSpec", head)
    groups = spec.get("workerGroupSpecs")
    if not isinstance(groups, list) or not groups:
        return problems + [f"{where}.workerGroupSpecs: must be a non-empty list"]
    names = [g.get("groupName") for g in groups]
    if len(set(map(str, names))) != len(names):
        problems.append(f"{where}.workerGroupSpecs: duplicate groupName in {names}")
    for i, group in enumerate(groups):
        here = f"{where}.workerGroupSpecs[{i}]"
        if not isinstance(group.get("groupName"), str) or not DNS_LABEL.match(group["groupName"]):
            problems.append(f"{here}.groupName: {group.get('groupName')!r} is not a DNS label")
        counts = [group.get(k) for k in ("minReplicas", "replicas", "maxReplicas")]
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
            problems.append(f"{here}: minReplicas, replicas, maxReplicas must be integers, got {counts}")
        elif not 0 <= counts[0] <= counts[1] <= counts[2]:
            problems.append(f"{here}: need 0 <= minReplicas <= replicas <= maxReplicas, got {counts}")
        problems += _group_problems(here, group)
    return problems


def _ray_autoscaler_reading(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Ray's KubeRay autoscaler turns a RayCluster spec into an autoscaling config and validates it."""
    cr = {"metadata": {"name": name, "namespace": "default"}, "spec": copy.deepcopy(spec)}
    return _derive_autoscaling_config_from_ray_cr(cr)


def _check_manifest_header(manifest: dict[str, Any], kind: str) -> None:
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == kind
    name = manifest["metadata"]["name"]
    assert isinstance(name, str) and DNS_LABEL.match(name) and len(name) <= 63, name


def _check_image_and_version(spec: dict[str, Any]) -> None:
    assert spec["rayVersion"] == ray.__version__  # the Ray pinned in pyproject.toml, inside the image
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    workdir = re.search(r"^WORKDIR\s+(\S+)", (KUBERAY / "Dockerfile").read_text(), re.M).group(1)
    for group in groups:
        ray_container = group["template"]["spec"]["containers"][0]
        assert ray_container["image"] == IMAGE
        assert ray_container.get("workingDir") == workdir  # relative entrypoint paths resolve in the repo


def test_raycluster_manifest():
    manifest = _load(KUBERAY / "raycluster.yaml")
    _check_manifest_header(manifest, "RayCluster")
    assert kuberay_cluster_problems(manifest["spec"]) == []
    _check_image_and_version(manifest["spec"])
    autoscaling = _ray_autoscaler_reading(manifest["metadata"]["name"], manifest["spec"])
    group = manifest["spec"]["workerGroupSpecs"][0]
    worker_type = autoscaling["available_node_types"][group["groupName"]]
    assert worker_type["resources"]["CPU"] == int(group["rayStartParams"]["num-cpus"])
    assert (worker_type["min_workers"], worker_type["max_workers"]) == (group["minReplicas"], group["maxReplicas"])


def test_rayjob_manifest():
    manifest = _load(KUBERAY / "rayjob.yaml")
    _check_manifest_header(manifest, "RayJob")
    spec = manifest["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    # KubeRay: exactly one of them, and it only deletes clusters it created itself
    assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec)
    if "rayClusterSpec" in spec:
        assert kuberay_cluster_problems(spec["rayClusterSpec"], "spec.rayClusterSpec") == []
        _check_image_and_version(spec["rayClusterSpec"])
        _ray_autoscaler_reading(manifest["metadata"]["name"], spec["rayClusterSpec"])
    else:
        assert not spec["shutdownAfterJobFinishes"], "shutdownAfterJobFinishes needs rayClusterSpec"


def test_rayjob_entrypoint_runs_a_config_of_the_repo():
    from bilevel_ray.cli import _parser
    from bilevel_ray.config import load_config

    entrypoint = _load(KUBERAY / "rayjob.yaml")["spec"]["entrypoint"]
    assert isinstance(entrypoint, str) and entrypoint.strip()
    argv = shlex.split(entrypoint)
    assert argv[0] == "bilevel-ray"
    args, extra = _parser().parse_known_args(argv[1:])
    assert args.command == "run"
    config = REPO / args.config
    assert config.is_file() and config.parent == REPO / "configs", args.config
    load_config(config, [*args.overrides, *extra])  # raises ConfigError on an invalid config


@pytest.mark.parametrize("mutate, problem", [
    (_set("headGroupSpec.rayStartParams.num-cpus", 2), "must be a string"),
    (_set("headGroupSpec.rayStartParams", ["dashboard-host=0.0.0.0"]), "must be a mapping"),
    (lambda s: s["workerGroupSpecs"][0].update(minReplicas=3, replicas=2), "minReplicas <= replicas"),
    (lambda s: s["workerGroupSpecs"][0].update(maxReplicas=1), "replicas <= maxReplicas"),
    (lambda s: s["workerGroupSpecs"][0].update(replicas="2"), "must be integers"),
    (lambda s: s["workerGroupSpecs"][0].pop("groupName"), "groupName"),
    (lambda s: s["workerGroupSpecs"].append(copy.deepcopy(s["workerGroupSpecs"][0])), "duplicate groupName"),
    (lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0].pop("image"), "image: missing"),
    (lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0].update(name="Ray_Head"), "DNS label"),
    (lambda s: s["headGroupSpec"]["template"]["spec"].update(containers=[]), "non-empty list"),
    (lambda s: s["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["requests"]
     .update(memory="17Gi"), "above its limit"),
    (lambda s: s["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["requests"]
     .update(cpu="4500m"), "above its limit"),
    (lambda s: s["workerGroupSpecs"][0]["rayStartParams"].update({"num-cpus": "16"}), "differs from the cpu limit"),
    (lambda s: s.pop("workerGroupSpecs"), "workerGroupSpecs"),
])
def test_kuberay_check_catches_broken_specs(mutate, problem):
    spec = _load(KUBERAY / "raycluster.yaml")["spec"]
    mutate(spec)
    problems = kuberay_cluster_problems(spec)
    assert any(problem in p for p in problems), problems


def test_dockerfile_builds_the_documented_image():
    text = (KUBERAY / "Dockerfile").read_text()
    instructions = [line.split(None, 1) for line in text.splitlines() if line and not line.startswith(("#", " "))]
    assert instructions[0] == ["FROM", "python:3.11-slim"]
    assert any(op == "COPY" and arg.split()[-2:] == [".", "."] for op, arg in instructions)
    assert any(op == "RUN" and "bash scripts/setup.sh" in arg for op, arg in instructions)
    assert re.search(r"install .*\bwget\b", text)  # KubeRay's probes run wget in the Ray container
    assert f"-f cluster_configs/kuberay/Dockerfile -t {IMAGE} ." in text
    ignored = (KUBERAY / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git", "runs"} <= set(ignored)
