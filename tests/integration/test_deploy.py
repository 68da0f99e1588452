"""The container image recipe and the Kubernetes manifests, checked without a cluster or a Docker engine:
every overlay renders (kustomize) and passes the Kubernetes schemas, ships no Secret, keeps dead letters and
SQLite state durable; every variable they set is a real setting and the whole set loads for ``run``, the
probes hit the served paths on CTSYNC_HTTP_LISTEN's port, and the drain fits in the grace period."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from dotenv import dotenv_values

from consumer.config import SETTING_VARIABLES, load_settings, parse_listen_address, unknown_variables
from tests import REPO_ROOT

ROOT = REPO_ROOT
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
OVERLAYS = ("kafka", "pubsub", "single-replica")
# The Secret the pods read and never ship: its keys are documented in this example file.
CREDENTIALS_EXAMPLE = KUBERNETES / "base" / "credentials.env.example"
SECRET_NAME = "ctsync-credentials"
# Kubernetes versions whose schemas every overlay must pass (oldest supported GKE minor and a recent one).
KUBERNETES_VERSIONS = ("1.29.0", "1.32.0")
# Variables an image or a pod may set that are not ctsync settings.
_STANDARD = re.compile(r"PYTHON\w*|PATH|HOME|LANG|LC_\w+|TZ|SSL_CERT_\w+")

Document = dict[str, Any]


def kustomize_command() -> list[str]:
    """Return how to run kustomize here: kubectl's built-in one, else the binary `make servers` builds."""
    kubectl = shutil.which("kubectl")
    if kubectl is not None:
        return [kubectl, "kustomize"]
    built = ROOT / ".cache" / "bin" / "kustomize"
    if built.is_file():
        return [str(built), "build"]
    pytest.skip("neither kubectl nor .cache/bin/kustomize: run `make servers`")


def render(directory: Path) -> list[Document]:
    done = subprocess.run(
        [*kustomize_command(), str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return [document for document in yaml.safe_load_all(done.stdout) if document]


@functools.cache
def _rendered(overlay: str) -> tuple[Document, ...]:
    return tuple(render(KUBERNETES / "overlays" / overlay))


def rendered(overlay: str) -> list[Document]:
    return list(_rendered(overlay))


def one(documents: list[Document], kind: str) -> Document:
    matches = [document for document in documents if document["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, found {len(matches)}"
    return matches[0]


def named(documents: list[Document], kind: str, name: str) -> Document:
    matches = [d for d in documents if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def ctsync_deployment(documents: list[Document]) -> Document:
    return named(documents, "Deployment", "ctsync")


def container(documents: list[Document]) -> Document:
    containers = ctsync_deployment(documents)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    found: Document = containers[0]
    return found


def credential_keys() -> dict[str, str]:
    return {name: value or "" for name, value in dotenv_values(CREDENTIALS_EXAMPLE).items()}


def environment(documents: list[Document]) -> dict[str, str]:
    """Return what the pod's environment would be: the ConfigMap, the Secret, then the container's env."""
    values: dict[str, str] = {}
    values.update(one(documents, "ConfigMap")["data"])
    # The example documents every key; a Pub/Sub deployment's Secret leaves the Kafka ones out.
    kafka = values.get("CTSYNC_SOURCE") == "kafka"
    values.update({k: v for k, v in credential_keys().items() if kafka or not k.startswith("KAFKA_")})
    for item in container(documents).get("env", []):
        values[item["name"]] = str(item.get("value", ""))
    return values


def dockerfile_stages() -> list[list[str]]:
    """Return the Dockerfile's stages as lists of logical lines (continuations joined, comments dropped)."""
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line for line in text.replace("\\\n", " ").splitlines() if not line.lstrip().startswith("#")]
    stages: list[list[str]] = []
    for line in lines:
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages and line.strip():
            stages[-1].append(line.strip())
    return stages


def test_every_document_parses_and_is_named() -> None:
    files = sorted(KUBERNETES.rglob("*.yaml"))
    assert files
    for path in files:
        for document in yaml.safe_load_all(path.read_text()):
            assert document, path
            assert document.get("apiVersion"), path
            if document["kind"] not in ("Kustomization", "Component"):
                assert document["metadata"]["name"], path


def test_every_kustomization_lists_existing_paths() -> None:
    for path in KUBERNETES.rglob("kustomization.yaml"):
        kustomization = yaml.safe_load(path.read_text())
        for entry in [*kustomization.get("resources", []), *kustomization.get("components", [])]:
            assert (path.parent / entry).exists(), f"{path}: {entry}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_renders_and_ships_no_secret(overlay: str) -> None:
    documents = rendered(overlay)
    kinds = {document["kind"] for document in documents}
    assert {"ConfigMap", "ServiceAccount", "Deployment", "Service"} <= kinds
    # An apply must never overwrite the real Secret made out of band (placeholders did, once).
    assert "Secret" not in kinds
    labels = [document["metadata"]["labels"] for document in documents]
    assert all(label.get("app.kubernetes.io/part-of") == "ctsync" for label in labels)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_passes_the_kubernetes_schemas(overlay: str, version: str) -> None:
    import kubernetes_validate

    for document in rendered(overlay):
        kubernetes_validate.validate(document, version, strict=True)


def _set_variables(documents: list[Document]) -> Iterator[tuple[str, str]]:
    for name in one(documents, "ConfigMap")["data"]:
        yield "ConfigMap", name
    for name in credential_keys():
        yield "Secret", name
    for item in container(documents).get("env", []):
        yield "Deployment", item["name"]
    for stage in dockerfile_stages():
        for line in stage:
            if line.upper().startswith("ENV "):
                for name in re.findall(r"(\w+)=", line[4:]):
                    yield "Dockerfile", name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_variable_set_is_a_real_setting(overlay: str) -> None:
    documents = rendered(overlay)
    settings = set(SETTING_VARIABLES)
    unknown = [
        (where, name)
        for where, name in _set_variables(documents)
        if not _STANDARD.fullmatch(name) and name not in settings
    ]
    assert unknown == []
    assert unknown_variables(environment(documents)) == []


@pytest.mark.parametrize(
    ("overlay", "state", "source"),
    [("kafka", "redis", "kafka"), ("pubsub", "redis", "pubsub"), ("single-replica", "sqlite", "kafka")],
)
def test_the_manifests_settings_load_for_run(overlay: str, state: str, source: str) -> None:
    documents = rendered(overlay)
    settings = load_settings(environ=environment(documents), for_command="run")
    assert settings.state.kind == state
    assert environment(documents)["CTSYNC_SOURCE"] == source
    for name in ("CTP_CLIENT_SECRET", "IPAAS_WEBHOOK_API_KEY", "KAFKA_SASL_PASSWORD"):
        assert name in credential_keys()
        assert name not in one(documents, "ConfigMap")["data"], f"{name} is a credential: Secret only"


def _port_number(port: int | str, ports: list[Mapping[str, Any]]) -> int:
    if isinstance(port, int):
        return port
    named_ports = [p["containerPort"] for p in ports if p.get("name") == port]
    assert named_ports, f"no container port named {port}"
    number: int = named_ports[0]
    return number


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_hit_the_served_paths_on_the_listen_port(overlay: str) -> None:
    documents = rendered(overlay)
    listen = parse_listen_address(environment(documents)["CTSYNC_HTTP_LISTEN"])
    assert listen.host in ("0.0.0.0", "::"), "the kubelet probes the pod IP, not loopback"
    spec = container(documents)
    ports = spec["ports"]
    probes = {name: spec[name]["httpGet"] for name in ("livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    for probe in [*probes.values(), spec.get("startupProbe", {}).get("httpGet")]:
        if probe is not None:
            assert _port_number(probe["port"], ports) == listen.port
    service_ports = named(documents, "Service", "ctsync")["spec"]["ports"]
    assert any(_port_number(p["targetPort"], ports) == listen.port for p in service_ports)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_graceful_termination_outlasts_the_drain(overlay: str) -> None:
    documents = rendered(overlay)
    settings = load_settings(environ=environment(documents), for_command="run")
    grace = ctsync_deployment(documents)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > settings.ctsync_drain_timeout_seconds


def _volumes_by_mount(documents: list[Document]) -> dict[str, Document]:
    pod = ctsync_deployment(documents)["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    return {mount["mountPath"]: volumes[mount["name"]] for mount in container(documents)["volumeMounts"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_is_locked_down_and_sized(overlay: str) -> None:
    documents = rendered(overlay)
    pod = ctsync_deployment(documents)["spec"]["template"]["spec"]
    spec = container(documents)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = _volumes_by_mount(documents)
    assert "emptyDir" in mounts["/tmp"]
    work = mounts["/var/lib/ctsync"]
    assert "emptyDir" in work or "persistentVolumeClaim" in work, "the image's working directory is writable"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(spec["resources"][kind])
    sources = {next(iter(source.values()))["name"] for source in spec["envFrom"]}
    assert sources == {one(documents, "ConfigMap")["metadata"]["name"], SECRET_NAME}


def _on_a_claim(documents: list[Document], path: str) -> bool:
    """Tell whether a file (a relative path lands in the working directory) is on a PersistentVolumeClaim."""
    absolute = path if path.startswith("/") else f"/var/lib/ctsync/{path}"
    claims = {
        name for name, volume in _volumes_by_mount(documents).items() if "persistentVolumeClaim" in volume
    }
    return any(absolute.startswith(mount.rstrip("/") + "/") for mount in claims)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_dead_letters_and_state_survive_the_pod(overlay: str) -> None:
    documents = rendered(overlay)
    environ = environment(documents)
    dead_letters = environ["CTSYNC_DEAD_LETTER_URL"]
    if dead_letters.startswith("file:"):
        assert _on_a_claim(documents, dead_letters.removeprefix("file:")), dead_letters
    else:
        assert dead_letters.startswith(("kafka://", "pubsub://")), dead_letters
    state = environ["CTSYNC_STATE_URL"]
    deployment = ctsync_deployment(documents)
    if state.startswith("sqlite:"):
        assert _on_a_claim(documents, state.removeprefix("sqlite:///")), state
        claims = [
            v["persistentVolumeClaim"]["claimName"]
            for v in _volumes_by_mount(documents).values()
            if "persistentVolumeClaim" in v
        ]
        assert all(named(documents, "PersistentVolumeClaim", claim) for claim in claims)
        # One writer on a ReadWriteOnce volume: never two pods at once, not even during a rollout.
        assert deployment["spec"]["replicas"] == 1
        assert deployment["spec"]["strategy"]["type"] == "Recreate"
    else:
        host = re.match(r"rediss?://(?:[^@/]*@)?([^:/]+)", state).group(1)  # type: ignore[union-attr]
        # The Redis the URL names is shipped, keeps an append-only file, on a claim of its own.
        named(documents, "Service", host)
        redis = named(documents, "StatefulSet", host)
        args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[args.index("--appendonly") + 1] == "yes"
        assert redis["spec"]["volumeClaimTemplates"]
        assert deployment["spec"]["replicas"] >= 2, "the shared-state overlays run several replicas"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_pod_runs_under_its_own_service_account(overlay: str) -> None:
    documents = rendered(overlay)
    pod = ctsync_deployment(documents)["spec"]["template"]["spec"]
    account = named(documents, "ServiceAccount", pod["serviceAccountName"])
    assert account.get("automountServiceAccountToken") is False
    if environment(documents)["CTSYNC_SOURCE"] == "pubsub":
        # Workload Identity on GKE: the Google credentials come from this binding, never from a key file.
        annotation = account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"]
        assert annotation.endswith(".iam.gserviceaccount.com")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_match_the_deployment(overlay: str) -> None:
    documents = rendered(overlay)
    deployment = ctsync_deployment(documents)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for document in documents:
        if (
            document["kind"] in ("Service", "PodDisruptionBudget")
            and document["metadata"]["name"] == "ctsync"
        ):
            spec = document["spec"]
            selector = spec["selector"].get("matchLabels", spec["selector"])
            assert selector.items() <= labels.items(), document["kind"]


def test_the_keda_component_targets_the_kafka_overlay(tmp_path: Path) -> None:
    # KEDA's CRD schema is not in any registry this project reaches: checked structurally, on a rendering
    # of the kafka overlay with the component added, as a user would add it.
    relative = os.path.relpath(KUBERNETES, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {relative}/overlays/kafka\ncomponents:\n  - {relative}/components/keda-kafka\n"
    )
    documents = render(tmp_path)
    deployment = ctsync_deployment(documents)
    scaled = one(documents, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    env = environment(documents)
    kafka = [trigger for trigger in spec["triggers"] if trigger["type"] == "kafka"]
    assert kafka and kafka[0]["metadata"]["consumerGroup"] == env["KAFKA_GROUP_ID"]
    assert kafka[0]["metadata"]["topic"] in env["KAFKA_TOPICS"].split(",")
    assert kafka[0]["metadata"]["bootstrapServers"] == env["KAFKA_BOOTSTRAP_SERVERS"]
    authentication = one(documents, "TriggerAuthentication")
    assert kafka[0]["authenticationRef"]["name"] == authentication["metadata"]["name"]
    refs = authentication["spec"]["secretTargetRef"]
    assert refs and all(ref["name"] == SECRET_NAME and ref["key"] in credential_keys() for ref in refs)
    assert {ref["parameter"] for ref in refs} == {"username", "password"}


def test_dockerfile_final_stage_is_slim_and_unprivileged() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: wheels are built apart from the runtime image"
    text = (DEPLOY / "Dockerfile").read_text()
    # A patch version on a named Debian release, never a moving minor tag.
    assert re.search(
        r"^ARG PYTHON_IMAGE=python:3\.11\.\d+-slim-(bookworm|trixie)(@sha256:[0-9a-f]{64})?$", text, re.M
    )
    final = stages[-1]
    body = "\n".join(final)
    users = [line.split()[1] for line in final if line.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    for tool in ("gcc", "build-essential", "apt-get install", "curl"):
        assert tool not in body, tool
    assert 'ENTRYPOINT ["ctsync"]' in final
    assert 'CMD ["run"]' in final
    check_at = next(i for i, line in enumerate(final) if line.upper().startswith("HEALTHCHECK"))
    healthcheck = " ".join(final[check_at : check_at + 2])
    assert "urllib" in healthcheck and "CTSYNC_HTTP_LISTEN" in healthcheck and "/healthz" in healthcheck
    assert "build-essential" in "\n".join(stages[0]), "the builder stage is where compilers belong"


def test_the_credentials_example_holds_placeholders_only_and_the_real_file_is_ignored() -> None:
    assert all(value.startswith("replace-with-") for value in credential_keys().values())
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", str(CREDENTIALS_EXAMPLE.with_suffix(""))], cwd=ROOT, check=False
    )
    assert ignored.returncode == 0, "credentials.env (the filled-in copy) must be git-ignored"


def test_the_image_healthcheck_asks_healthz_on_the_configured_port(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    command = json.loads(re.search(r"HEALTHCHECK[^\[]*CMD (\[.*\])", text).group(1))  # type: ignore[union-attr]
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            return None

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.handle_request, daemon=True).start()
    env = {"CTSYNC_HTTP_LISTEN": f"0.0.0.0:{server.server_address[1]}", "PATH": os.environ.get("PATH", "")}
    done = subprocess.run([sys.executable, *command[1:]], env=env, timeout=20)
    server.server_close()
    assert done.returncode == 0 and asked == ["/healthz"]


def _locked(path: Path) -> dict[str, tuple[str, list[str]]]:
    """Return the lock's pins: canonical name -> (version, hashes)."""
    from packaging.utils import canonicalize_name

    pins: dict[str, tuple[str, list[str]]] = {}
    text = path.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        match = re.match(r"([A-Za-z0-9_.\-]+)==(\S+)", line)
        if match:
            pins[canonicalize_name(match.group(1))] = (match.group(2), re.findall(r"--hash=sha256:\w+", line))
    return pins


def test_the_locks_pin_every_declared_range_with_hashes() -> None:
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = _locked(ROOT / "requirements" / "runtime.txt")
    dev = _locked(ROOT / "requirements" / "dev.txt")
    extras = [line for group in project["optional-dependencies"].values() for line in group]
    for lock, declared in ((runtime, project["dependencies"]), (dev, project["dependencies"] + extras)):
        for line in declared:
            requirement = Requirement(line)
            name = canonicalize_name(requirement.name)
            assert name in lock, f"{name} is declared but not locked: run make lock"
            assert requirement.specifier.contains(lock[name][0]), f"{name}=={lock[name][0]} outside {line}"
    for pins in (runtime, dev):
        assert all(hashes for _, hashes in pins.values()), "pip --require-hashes needs a hash for every pin"
    # The image and the tests run the same versions.
    assert {name: pin[0] for name, pin in runtime.items()} == {name: dev[name][0] for name in runtime}


def test_the_image_and_make_install_use_the_locks() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "--require-hashes -r requirements/runtime.txt" in dockerfile
    assert "--no-deps" in dockerfile
    makefile = (ROOT / "Makefile").read_text()
    assert "LOCK := requirements/dev.txt" in makefile and "--require-hashes -r $(LOCK)" in makefile
