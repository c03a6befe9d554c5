"""deploy/k8s/ is valid Kubernetes, runs every service as a real CLI command, ships no secret,
and (with docker-compose.yml) names only settings that exist.

No cluster runs here: each object is validated against the Kubernetes OpenAPI schemas shipped in
the ``kubernetes-validate`` package (strict: an unknown field is an error).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from buildtel.cli.main import build_parser
from buildtel.services import registry
from buildtel.shared.auth import ROLES, password_variable
from buildtel.shared.settings import describe

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
VERSION = "1.30.0"
SECRETS = {password_variable(r) for r in ROLES} | {"BUILDTEL_REDIS_PASSWORD", "BUILDER_TELEMETRY_HTTP_TOKEN",
                                                   "BUILDTEL_NATS_ROUTE_PASSWORD"}


def _objects() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return list(obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []))


def test_every_object_is_valid_against_the_kubernetes_schemas() -> None:
    objs = _objects()
    assert {o["kind"] for _, o in objs} >= {"StatefulSet", "Deployment", "Service", "ConfigMap"}
    for name, obj in objs:
        try:
            kubernetes_validate.validate(obj, VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{name}: {obj['kind']} {obj['metadata']['name']}: {exc}") from None
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert all((K8S / r).is_file() for r in kustomization["resources"])


def test_a_broken_manifest_is_rejected_by_the_same_check() -> None:
    obj = next(o for _, o in _objects() if o["kind"] == "Deployment")
    broken = json.loads(json.dumps(obj))
    broken["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSION, strict=True)


def test_nats_is_a_three_node_jetstream_statefulset_from_the_generated_config() -> None:
    objs = dict((o["metadata"]["name"], o) for _, o in _objects() if o["kind"] == "StatefulSet")
    nats = objs["nats"]
    assert nats["spec"]["replicas"] == 3 and nats["spec"]["volumeClaimTemplates"]
    env = {e["name"]: e for e in _containers(nats)[0]["env"]}
    assert env["NATS_ROUTES"]["value"].count(":6222") == 3
    assert env["NATS_SERVER_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # The ConfigMap is what deploy/render_nats_conf.py writes (roles from shared/auth.py).
    spec = importlib.util.spec_from_file_location("render_nats_conf", ROOT / "deploy" / "render_nats_conf.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert (K8S / "nats-config.yaml").read_text() == mod.render_configmap(), "run deploy/render_nats_conf.py"


def _ours() -> list[dict[str, Any]]:
    """The Deployments and StatefulSets that run the project's image (not NATS, not Redis)."""
    return [o for _, o in _objects() if o["kind"] in ("Deployment", "StatefulSet")
            and _containers(o)[0]["image"].startswith("builder-telemetry")]


def _pod_args(obj: dict[str, Any], ordinal: int) -> list[str]:
    """A container's args as Kubernetes expands them in pod ``ordinal``: ``$(VAR)`` from the
    container's env (plain values, and the downward API's pod name and pod-index label)."""
    [c] = _containers(obj)
    values = {}
    for e in c["env"]:
        path = e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        if "value" in e:
            values[e["name"]] = e["value"]
        elif path == "metadata.labels['apps.kubernetes.io/pod-index']":
            values[e["name"]] = str(ordinal)
        elif path == "metadata.name":
            values[e["name"]] = f"{obj['metadata']['name']}-{ordinal}"
    args = [re.sub(r"\$\(([A-Z_]+)\)", lambda m: values[m.group(1)], a) for a in c["args"]]
    return args


def test_one_workload_per_service_each_a_real_command_with_probes_and_r3() -> None:
    parser = build_parser()
    served = set()
    for obj in _ours():
        [c] = _containers(obj)
        args = parser.parse_args(_pod_args(obj, 0))
        assert args.func.__name__ == "cmd_serve"
        assert obj["kind"] == ("StatefulSet" if args.service == "storage" else "Deployment"), args.service
        served.add(args.service)
        env = {e["name"]: e for e in c["env"]}
        assert env["BUILDER_TELEMETRY_REPLICAS"]["value"] == "3"
        assert env["BUILDER_TELEMETRY_NATS_URL"]["value"].count("nats://") == 3  # every node: failover
        assert env["BUILDER_TELEMETRY_NATS_USER"]["value"] == args.service  # its own role
        for probe in ("readinessProbe", "livenessProbe"):
            assert "/healthz" in json.dumps(c[probe]), (args.service, probe)
    assert served == set(registry.SERVICES)


def test_every_storage_partition_runs_once_on_its_own_volume_and_every_service_has_the_same_count() -> None:
    parser = build_parser()
    counts = {}
    for obj in _ours():
        env = {e["name"]: e for e in _containers(obj)[0]["env"]}
        counts[obj["metadata"]["name"]] = int(env["BUILDER_TELEMETRY_STORAGE_PARTITIONS"]["value"])
    assert len(set(counts.values())) == 1, f"every service must take the same partition count: {counts}"
    partitions = counts["buildtel-storage"]
    assert partitions == 3
    [storage] = [o for o in _ours() if parser.parse_args(_pod_args(o, 0)).service == "storage"]
    replicas = storage["spec"]["replicas"]
    owned = [parser.parse_args(_pod_args(storage, k)).partition for k in range(replicas)]
    assert sorted(owned) == list(range(partitions)), f"pods own {owned}, want each of 0..{partitions - 1} once"
    # Its own volume: a claim per pod from the template, mounted as the data directory; no shared claim.
    [claim] = storage["spec"]["volumeClaimTemplates"]
    [c] = _containers(storage)
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in c["volumeMounts"]
    assert not storage["spec"]["template"]["spec"].get("volumes")
    assert storage["spec"]["serviceName"] in {o["metadata"]["name"] for _, o in _objects() if o["kind"] == "Service"}


def test_no_secret_value_is_committed_and_every_reference_is_a_documented_variable() -> None:
    refs = set()
    for _, obj in _objects():
        assert obj["kind"] != "Secret", "credentials come from the secretGenerator, not from a committed Secret"
        refs |= set(re.findall(r"'key': '([A-Z_]+)'", str(obj)))
    assert refs == SECRETS
    gen = yaml.safe_load((K8S / "kustomization.yaml").read_text())["secretGenerator"]
    assert gen == [{"name": "buildtel-credentials", "envs": ["credentials.env"]}]
    assert not (K8S / "credentials.env").exists() or "credentials.env" in (ROOT / ".gitignore").read_text()
    doc = (ROOT / "docs" / "deploy.md").read_text()
    assert all(v in doc for v in SECRETS)


def test_compose_and_k8s_name_only_existing_settings() -> None:
    known = {var for var, _default, _help in describe()}
    texts = [(ROOT / "docker-compose.yml").read_text()] + [p.read_text() for p in K8S.glob("*.yaml")]
    used = {v for t in texts for v in re.findall(r"\b(BUILDER_TELEMETRY_[A-Z_]+)\b", t)}
    assert "BUILDER_TELEMETRY_REPLICAS" in used
    assert used <= known, f"not settings: {sorted(used - known)}"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    nodes = [n for n in compose["services"] if n.startswith("nats-")]
    assert len(nodes) == 3
    assert compose["services"]["collector"]["environment"]["BUILDER_TELEMETRY_REPLICAS"] == "3"
