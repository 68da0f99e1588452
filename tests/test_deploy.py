"""The container image recipe and the Kubernetes manifests, checked without a cluster or a Docker engine:
every document parses, every variable they set is a real setting and the whole set loads for ``run``, the
probes hit the served paths on CTSYNC_HTTP_LISTEN's port, and the drain fits in the grace period."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from consumer.config import SETTING_VARIABLES, load_settings, parse_listen_address, unknown_variables

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
# Variables an image or a pod may set that are not ctsync settings.
_STANDARD = re.compile(r"PYTHON\w*|PATH|HOME|LANG|LC_\w+|TZ|SSL_CERT_\w+")

Document = dict[str, Any]


def documents() -> list[tuple[Path, Document]]:
    found = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document is not None:
                found.append((path, document))
    return found


def one(kind: str) -> Document:
    matches = [document for _, document in documents() if document["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, found {len(matches)}"
    return matches[0]


def container() -> Document:
    containers = one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    found: Document = containers[0]
    return found


def environment() -> dict[str, str]:
    """Return what the pod's environment would be: the ConfigMap, the Secret, then the container's env."""
    values: dict[str, str] = {}
    values.update(one("ConfigMap")["data"])
    values.update(one("Secret")["stringData"])
    for item in container().get("env", []):
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
    found = documents()
    kinds = {document["kind"] for _, document in found}
    assert {"ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget", "ScaledObject"} <= kinds
    for path, document in found:
        assert document.get("apiVersion"), path
        if document["kind"] != "Kustomization":
            assert document["metadata"]["name"], path


def test_kustomization_lists_existing_files() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (KUBERNETES / resource).is_file(), resource
    rendered = {document["kind"] for path, document in documents() if path.name in kustomization["resources"]}
    assert {"ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget"} <= rendered


def test_kustomize_renders_when_kubectl_is_here() -> None:
    # Client-side only (no cluster); machines without kubectl rely on the structural checks above.
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return
    rendered = subprocess.run(
        [kubectl, "kustomize", str(KUBERNETES)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    kinds = {document["kind"] for document in yaml.safe_load_all(rendered) if document}
    assert {"ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget"} <= kinds


def _set_variables() -> Iterator[tuple[str, str]]:
    for name in one("ConfigMap")["data"]:
        yield "ConfigMap", name
    for name in one("Secret")["stringData"]:
        yield "Secret", name
    for item in container().get("env", []):
        yield "Deployment", item["name"]
    for stage in dockerfile_stages():
        for line in stage:
            if line.upper().startswith("ENV "):
                for name in re.findall(r"(\w+)=", line[4:]):
                    yield "Dockerfile", name


def test_every_variable_set_is_a_real_setting() -> None:
    settings = set(SETTING_VARIABLES)
    unknown = [
        (where, name)
        for where, name in _set_variables()
        if not _STANDARD.fullmatch(name) and name not in settings
    ]
    assert unknown == []
    assert unknown_variables(environment()) == []


def test_the_manifests_settings_load_for_run() -> None:
    settings = load_settings(environ=environment(), for_command="run")
    assert settings.state.kind == "redis", "replicas share the throttle and dedupe state only through Redis"
    secret = one("Secret")["stringData"]
    for name in ("CTP_CLIENT_SECRET", "IPAAS_WEBHOOK_API_KEY", "KAFKA_SASL_PASSWORD"):
        assert name in secret
        assert name not in one("ConfigMap")["data"], f"{name} is a credential: Secret only"


def _port_number(port: int | str, ports: list[Mapping[str, Any]]) -> int:
    if isinstance(port, int):
        return port
    named = [p["containerPort"] for p in ports if p.get("name") == port]
    assert named, f"no container port named {port}"
    number: int = named[0]
    return number


def test_probes_hit_the_served_paths_on_the_listen_port() -> None:
    listen = parse_listen_address(environment()["CTSYNC_HTTP_LISTEN"])
    assert listen.host in ("0.0.0.0", "::"), "the kubelet probes the pod IP, not loopback"
    spec = container()
    ports = spec["ports"]
    probes = {name: spec[name]["httpGet"] for name in ("livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    for probe in [*probes.values(), spec.get("startupProbe", {}).get("httpGet")]:
        if probe is not None:
            assert _port_number(probe["port"], ports) == listen.port
    service_ports = one("Service")["spec"]["ports"]
    assert any(_port_number(p["targetPort"], ports) == listen.port for p in service_ports)


def test_graceful_termination_outlasts_the_drain() -> None:
    settings = load_settings(environ=environment(), for_command="run")
    grace = one("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > settings.ctsync_drain_timeout_seconds


def test_pod_is_locked_down_and_sized() -> None:
    pod = one("Deployment")["spec"]["template"]["spec"]
    spec = container()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec["securityContext"]["allowPrivilegeEscalation"] is False
    empty_dirs = {volume["name"] for volume in pod["volumes"] if "emptyDir" in volume}
    mounts = {mount["mountPath"]: mount["name"] for mount in spec["volumeMounts"]}
    assert mounts.get("/tmp") in empty_dirs
    assert mounts.get("/var/lib/ctsync") in empty_dirs, "the image's working directory must be writable"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(spec["resources"][kind])
    sources = {next(iter(source.values()))["name"] for source in spec["envFrom"]}
    assert sources == {one("ConfigMap")["metadata"]["name"], one("Secret")["metadata"]["name"]}


def test_selectors_and_targets_match_the_deployment() -> None:
    deployment = one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for kind in ("Service", "PodDisruptionBudget"):
        spec = one(kind)["spec"]
        selector = spec["selector"].get("matchLabels", spec["selector"])
        assert selector.items() <= labels.items(), kind
    scaled = one("ScaledObject")["spec"]
    assert scaled["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    env = environment()
    kafka = [trigger for trigger in scaled["triggers"] if trigger["type"] == "kafka"]
    assert kafka and kafka[0]["metadata"]["consumerGroup"] == env["KAFKA_GROUP_ID"]
    assert kafka[0]["metadata"]["topic"] in env["KAFKA_TOPICS"].split(",")
    auth = one("TriggerAuthentication")["spec"]["secretTargetRef"]
    secret = one("Secret")
    assert all(
        ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"] for ref in auth
    )


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


def test_the_secret_holds_placeholders_only() -> None:
    assert all(value.startswith("replace-with-") for value in one("Secret")["stringData"].values())


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
