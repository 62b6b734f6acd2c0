"""The template's Docker and Kubernetes files: rendered, validated against Kubernetes' schemas
offline, and checked for what the service relies on (probes, shutdown budget, addresses, user).

Rendering takes the template from this checkout, uncommitted changes included; nothing here
uses the network, Docker or a cluster.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import copier
import kubernetes_validate
import pytest
import yaml

from tether.config import TetherConfig, load_config

ROOT = Path(__file__).resolve().parents[2]

#: The Kubernetes release whose API schemas the manifests must satisfy. kubernetes-validate
#: ships the schemas of about a dozen releases, the newest matching its own version.
KUBERNETES_VERSION = "1.37.0"

SERVICE = "shop-api"
PACKAGE = "shop_api"
ANSWERS: dict[str, Any] = {
    "service_name": SERVICE,
    "docker": True,
    "kubernetes": True,
    "tether_requirement": "tether>=0.1,<0.2",
}
MANIFESTS = (
    "configmap.yaml",
    "deployment.yaml",
    "hpa.yaml",
    "otel-agent.yaml",
    "pdb.yaml",
    "service.yaml",
)
NAME = "app.kubernetes.io/name"
#: What the kubelet puts in the pod's fieldRefs, to load the configuration as a pod would.
FIELDS = {
    "status.podIP": "10.244.1.7",
    "status.hostIP": "10.0.0.4",
    "metadata.name": f"{SERVICE}-5d4f8b7c9-x2x7q",
}

Manifest = dict[str, Any]


def render(destination: Path, **answers: Any) -> Path:
    """Render the template into ``destination`` from this checkout, as it is on disk."""
    # With vcs_ref="HEAD", copier clones a local repository and commits its working tree on
    # top (changed and untracked files, .gitignore respected), so uncommitted edits render too.
    copier.run_copy(
        src_path=str(ROOT),
        dst_path=destination,
        data=answers,
        defaults=True,
        unsafe=False,
        vcs_ref="HEAD",
        quiet=True,
    )
    return destination


def load_documents(path: Path) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def load_with_env(path: Path, env: Mapping[str, str]) -> TetherConfig:
    """Load ``path`` as tether would in a process whose only TETHER_* variables are ``env``."""
    with pytest.MonkeyPatch.context() as patch:
        for name in [name for name in os.environ if name.startswith("TETHER_")]:
            patch.delenv(name)
        for name, value in env.items():
            patch.setenv(name, value)
        return load_config(path)


def resolve_env(container: Manifest) -> dict[str, str]:
    """The container's environment as the kubelet builds it: fieldRefs filled in from FIELDS,
    and ``$(VAR)`` expanded only when VAR is defined earlier in the list."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "valueFrom" in var:
            env[var["name"]] = FIELDS[var["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            env[var["name"]] = re.sub(
                r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), var.get("value", "")
            )
    return env


def field_ref(container: Manifest, name: str) -> str | None:
    [var] = [var for var in container["env"] if var["name"] == name]
    ref: str | None = var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
    return ref


def dockerfile_stages(text: str) -> list[list[tuple[str, str]]]:
    """The Dockerfile's stages, each a list of (INSTRUCTION, arguments), continuations joined."""
    stages: list[list[tuple[str, str]]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        pending = ""
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append((keyword.upper(), arguments.strip()))
    return stages


def arguments_of(stage: list[tuple[str, str]], keyword: str) -> list[str]:
    return [arguments for instruction, arguments in stage if instruction == keyword]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render(tmp_path_factory.mktemp("rendered") / "svc", **ANSWERS)


@pytest.fixture(scope="module")
def objects(project: Path) -> list[Manifest]:
    return [doc for name in MANIFESTS for doc in load_documents(project / "deploy/k8s" / name)]


def one(objects: list[Manifest], kind: str) -> Manifest:
    """The only object of ``kind`` that belongs to the service (not to the tracing agent)."""
    [found] = [
        o
        for o in objects
        if o["kind"] == kind and o["metadata"].get("labels", {}).get(NAME) == SERVICE
    ]
    return found


@pytest.fixture(scope="module")
def deployment(objects: list[Manifest]) -> Manifest:
    return one(objects, "Deployment")


@pytest.fixture(scope="module")
def pod(deployment: Manifest) -> Manifest:
    spec: Manifest = deployment["spec"]["template"]["spec"]
    return spec


@pytest.fixture(scope="module")
def container(pod: Manifest) -> Manifest:
    [found] = [c for c in pod["containers"] if c["name"] == SERVICE]
    return found


@pytest.fixture(scope="module")
def ports(container: Manifest) -> dict[str, int]:
    """The container's ports by name."""
    return {port["name"]: port["containerPort"] for port in container["ports"]}


@pytest.fixture(scope="module")
def cluster_config_file(objects: list[Manifest], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ConfigMap's tether.yaml, written to a file."""
    path = tmp_path_factory.mktemp("configmap") / "tether.yaml"
    path.write_text(one(objects, "ConfigMap")["data"]["tether.yaml"])
    return path


@pytest.fixture(scope="module")
def pod_config(cluster_config_file: Path, container: Manifest) -> TetherConfig:
    """The configuration a pod runs with: the ConfigMap's file under the pod's environment."""
    env = {k: v for k, v in resolve_env(container).items() if k.startswith("TETHER_")}
    env.pop("TETHER_CONFIG")  # names the file, which load_config is given here
    return load_with_env(cluster_config_file, env)


@pytest.fixture(scope="module")
def configs(project: Path, cluster_config_file: Path) -> list[TetherConfig]:
    """The project's tether.yaml and the ConfigMap's, each as loaded alone."""
    return [load_with_env(path, {}) for path in (project / "tether.yaml", cluster_config_file)]


@pytest.fixture(scope="module")
def final_stage(project: Path) -> list[tuple[str, str]]:
    return dockerfile_stages((project / "Dockerfile").read_text())[-1]


# --------------------------------------------------------------------------- files


def test_the_docker_and_kubernetes_files_are_rendered(project: Path) -> None:
    """docker and kubernetes answered yes: the Dockerfile, .dockerignore and deploy/k8s."""
    assert (project / "Dockerfile").is_file()
    assert (project / ".dockerignore").is_file()
    rendered = sorted(p.name for p in (project / "deploy/k8s").iterdir())
    assert rendered == sorted([*MANIFESTS, "README.md"])


@pytest.mark.parametrize(("docker", "kubernetes"), [(False, False), (True, False), (False, True)])
def test_files_follow_their_answers(tmp_path: Path, docker: bool, kubernetes: bool) -> None:
    """A no to docker leaves out the Dockerfile and .dockerignore; a no to kubernetes deploy/."""
    project = render(tmp_path / "svc", **{**ANSWERS, "docker": docker, "kubernetes": kubernetes})
    assert (project / "Dockerfile").exists() is docker
    assert (project / ".dockerignore").exists() is docker
    assert (project / "deploy").exists() is kubernetes


# --------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("name", MANIFESTS)
def test_each_manifest_is_yaml_of_kubernetes_objects(project: Path, name: str) -> None:
    """Every document has apiVersion, kind and a name; one kind per file but the agent's."""
    documents = load_documents(project / "deploy/k8s" / name)
    assert documents
    for doc in documents:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys()
        assert doc["metadata"]["name"]
    if name != "otel-agent.yaml":
        assert len(documents) == 1


@pytest.mark.parametrize("name", MANIFESTS)
def test_each_object_passes_the_kubernetes_schema(project: Path, name: str) -> None:
    """Strict validation: right types, required fields, and no field the API does not have."""
    problems = []
    for doc in load_documents(project / "deploy/k8s" / name):
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:  # its text holds the whole schema
            where = "/".join(str(part) for part in exc.path)
            problems.append(f"{doc['kind']} {doc['metadata']['name']}: {where}: {exc.message}")
    assert not problems, f"{name} (Kubernetes {KUBERNETES_VERSION}): {problems}"


def test_strict_validation_refuses_an_unknown_field(deployment: Manifest) -> None:
    """The schema check has teeth: a misspelled field fails it."""
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


# --------------------------------------------------------------------------- labels and ports


def test_the_services_objects_carry_its_name_and_select_its_pods(objects: list[Manifest]) -> None:
    """Every object but the shared agent is labelled with the service name; selectors match
    the pod template, and nothing of the agent's matches them."""
    ours = [o for o in objects if o["metadata"]["labels"].get(NAME) == SERVICE]
    assert sorted(o["kind"] for o in ours) == [
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Service",
    ]
    deployment = one(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = [
        deployment["spec"]["selector"]["matchLabels"],
        one(objects, "Service")["spec"]["selector"],
        one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    ]
    agent = next(o for o in objects if o["kind"] == "DaemonSet")
    agent_labels = agent["spec"]["template"]["metadata"]["labels"]
    for selector in selectors:
        assert selector == {NAME: SERVICE}
        assert selector.items() <= pod_labels.items()
        assert not selector.items() <= agent_labels.items()


def test_the_service_exposes_the_container_ports(
    objects: list[Manifest], ports: dict[str, int]
) -> None:
    """Each Service port targets the container port of its name and number; gRPC says so."""
    service = one(objects, "Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert sorted(p["name"] for p in service["spec"]["ports"]) == sorted(ports)
    for port in service["spec"]["ports"]:
        target = port["targetPort"]
        assert target == port["name"] or target == ports[port["name"]]
        assert port["port"] == ports[port["name"]]
    [grpc] = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
    assert grpc["appProtocol"] == "grpc"
    assert ports == {"grpc": 50051, "metrics": 9464}  # the template's default answers


def test_the_hpa_scales_the_deployment_on_cpu(objects: list[Manifest], container: Manifest) -> None:
    """2 to 10 replicas on CPU utilisation, which needs a CPU request; the PDB keeps one."""
    hpa = one(objects, "HorizontalPodAutoscaler")
    deployment = one(objects, "Deployment")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert container["resources"]["requests"]["cpu"]
    assert deployment["spec"]["replicas"] == 2
    assert one(objects, "PodDisruptionBudget")["spec"]["minAvailable"] == 1


# --------------------------------------------------------------------------- the pod


def test_the_probes_are_grpc_health_checks_on_the_grpc_port(
    container: Manifest, ports: dict[str, int]
) -> None:
    """Readiness and liveness (and startup) use the kubelet's native gRPC probe."""
    kinds = [k for k in ("startupProbe", "readinessProbe", "livenessProbe") if k in container]
    assert {"readinessProbe", "livenessProbe"} <= set(kinds)
    handlers = {"grpc", "httpGet", "tcpSocket", "exec"}
    for kind in kinds:
        probe = container[kind]
        assert handlers & probe.keys() == {"grpc"}, kind
        assert probe["grpc"]["port"] == ports["grpc"], kind
    assert container["readinessProbe"]["grpc"].get("service", "") == ""


def test_the_grace_period_outlasts_prestop_drain_grace_and_the_last_export(
    pod: Manifest, container: Manifest, configs: list[TetherConfig]
) -> None:
    """terminationGracePeriodSeconds > preStop sleep + drain + grace (+ the span export)."""
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    assert pre_stop > 0
    for config in configs:
        budget = pre_stop + config.server.drain_seconds + config.server.grace_seconds
        if config.tracing.enabled:
            budget += config.tracing.timeout_seconds
        assert pod["terminationGracePeriodSeconds"] > budget


def test_liveness_does_not_restart_a_draining_pod(
    container: Manifest, configs: list[TetherConfig]
) -> None:
    """Health reads NOT_SERVING through drain and grace: fewer failures than restart a pod."""
    probe = container["livenessProbe"]
    tolerated = (probe.get("failureThreshold", 3) - 1) * probe.get("periodSeconds", 10)
    for config in configs:
        assert tolerated > config.server.drain_seconds + config.server.grace_seconds


def test_the_container_runs_as_the_images_non_root_user(
    pod: Manifest, container: Manifest, final_stage: list[tuple[str, str]]
) -> None:
    """Non-root by number (the Dockerfile's UID), read-only root, no privilege, no capability."""
    effective = {**pod.get("securityContext", {}), **container["securityContext"]}
    assert effective["runAsNonRoot"] is True
    image_uid = int(arguments_of(final_stage, "USER")[-1].split(":")[0])
    assert effective["runAsUser"] == image_uid != 0
    assert effective["readOnlyRootFilesystem"] is True
    assert effective["allowPrivilegeEscalation"] is False
    assert effective["capabilities"]["drop"] == ["ALL"]


def test_the_pod_advertises_its_own_ip(container: Manifest, pod_config: TetherConfig) -> None:
    """TETHER_SERVER__ADVERTISE_HOST is the pod IP: what peers dial, found in etcd."""
    assert field_ref(container, "TETHER_SERVER__ADVERTISE_HOST") == "status.podIP"
    assert pod_config.server.advertise_host == FIELDS["status.podIP"]
    assert pod_config.server.host == "0.0.0.0"


def test_spans_go_to_the_agent_on_the_pods_node(
    objects: list[Manifest], container: Manifest, pod_config: TetherConfig
) -> None:
    """The tracing endpoint is the node IP (defined before it is used) at the agent's hostPort,
    where the agent's OTLP gRPC receiver listens."""
    assert field_ref(container, "NODE_IP") == "status.hostIP"
    assert pod_config.tracing.enabled
    assert pod_config.tracing.endpoint == f"http://{FIELDS['status.hostIP']}:4317"

    agent = next(o for o in objects if o["kind"] == "DaemonSet")
    [collector] = agent["spec"]["template"]["spec"]["containers"]
    image, _, tag = collector["image"].partition(":")
    assert image == "otel/opentelemetry-collector-contrib"
    assert re.fullmatch(r"\d+\.\d+\.\d+", tag), f"pin the collector image: {tag!r}"
    host_ports = [p["hostPort"] for p in collector["ports"] if "hostPort" in p]
    assert host_ports == [4317]

    [agent_config] = [
        o
        for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "otel-agent-config"
    ]
    collector_config = yaml.safe_load(agent_config["data"]["config.yaml"])
    assert collector_config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"] == "0.0.0.0:4317"
    traces = collector_config["service"]["pipelines"]["traces"]
    assert traces["receivers"] == ["otlp"]
    assert "batch" in traces["processors"]
    assert all(name in collector_config["exporters"] for name in traces["exporters"])
    assert all(name in collector_config["processors"] for name in traces["processors"])


def test_the_configmap_holds_a_valid_tether_config(
    pod: Manifest, container: Manifest, cluster_config_file: Path, ports: dict[str, int]
) -> None:
    """The embedded tether.yaml loads and agrees with the pod; TETHER_CONFIG points at it."""
    config = load_with_env(cluster_config_file, {})
    assert config.service.name == SERVICE
    assert (config.server.host, config.server.port) == ("0.0.0.0", ports["grpc"])
    assert (config.metrics.host, config.metrics.port) == ("0.0.0.0", ports["metrics"])
    assert config.metrics.enabled
    assert config.service.environment == "production"
    assert (config.log_format, config.serves_reflection) == ("json", False)
    assert config.registry.backend == "etcd"

    config_path = Path(resolve_env(container)["TETHER_CONFIG"])
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == str(config_path.parent)]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == f"{SERVICE}-config"
    assert config_path.name == "tether.yaml"


def test_every_tether_variable_of_the_pod_names_a_setting(pod_config: TetherConfig) -> None:
    """Loading with the pod's TETHER_* environment succeeds (a misspelled field would not)."""
    assert pod_config.service.instance_id == FIELDS["metadata.name"]


# --------------------------------------------------------------------------- the image


def test_the_image_is_built_in_two_stages(project: Path) -> None:
    """Build: python:3.11-slim, a venv at /opt/venv, generated protos. Runtime: that venv."""
    build, final = dockerfile_stages((project / "Dockerfile").read_text())
    assert arguments_of(build, "FROM") == ["python:3.11-slim AS build"]
    assert arguments_of(final, "FROM") == ["python:3.11-slim"]
    build_runs = " ".join(arguments_of(build, "RUN"))
    assert "python -m venv /opt/venv" in build_runs
    assert "tether proto --proto-path proto --out ." in build_runs
    assert build_runs.index("tether proto") < build_runs.index("pip install --no-deps .")
    assert "--from=build /opt/venv /opt/venv" in arguments_of(final, "COPY")


def test_the_image_runs_as_a_numeric_non_root_user(final_stage: list[tuple[str, str]]) -> None:
    """The last USER is a number (runAsNonRoot can check it) and not 0."""
    user = arguments_of(final_stage, "USER")[-1]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, user
    assert not gid or gid.isdigit(), user


def test_the_final_stage_never_runs_as_root(final_stage: list[tuple[str, str]]) -> None:
    """Every USER of the runtime stage is the UID its useradd creates (not just the last), and
    nothing in it switches user again (su, sudo, gosu, setpriv)."""
    [created] = re.findall(r"useradd [^&]*--uid (\d+)", " ".join(arguments_of(final_stage, "RUN")))
    users = [user.split(":")[0] for user in arguments_of(final_stage, "USER")]
    assert users and set(users) == {created} and created != "0", users
    commands = " ".join(args for _, args in final_stage)
    assert not re.search(r"\b(su|sudo|gosu|setpriv|su-exec)\b", commands)


def test_the_image_starts_python_in_exec_form(final_stage: list[tuple[str, str]]) -> None:
    """ENTRYPOINT is a JSON list, so SIGTERM reaches Python rather than a shell."""
    entrypoint = json.loads(arguments_of(final_stage, "ENTRYPOINT")[-1])
    assert entrypoint == ["python", "-m", PACKAGE]
    assert not arguments_of(final_stage, "CMD")


def test_the_image_exposes_both_ports_and_sets_its_environment(
    project: Path, final_stage: list[tuple[str, str]], ports: dict[str, int]
) -> None:
    """EXPOSE names the gRPC and metrics ports; ENV's TETHER_* settings load with tether.yaml,
    and turn its development environment into production."""
    exposed = {int(port) for args in arguments_of(final_stage, "EXPOSE") for port in args.split()}
    assert exposed == set(ports.values())
    env = dict(
        token.split("=", 1)
        for args in arguments_of(final_stage, "ENV")
        for token in shlex.split(args)
    )
    assert env["TETHER_SERVER__HOST"] == "0.0.0.0"
    assert env["TETHER_SERVICE__ENVIRONMENT"] == "production"
    tether_env = {k: v for k, v in env.items() if k.startswith("TETHER_")}
    assert load_with_env(project / "tether.yaml", {}).service.environment == "development"
    config = load_with_env(project / "tether.yaml", tether_env)
    assert config.server.host == "0.0.0.0"
    assert (config.log_format, config.serves_reflection) == ("json", False)


def test_the_build_context_leaves_out_local_state(project: Path) -> None:
    """.dockerignore keeps the venv and the generated modules (rebuilt in the image) out."""
    ignored = {
        line.strip()
        for line in (project / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", "**/*_pb2.py", "**/*_pb2_grpc.py", "**/__pycache__"} <= ignored
