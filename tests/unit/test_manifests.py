"""Every Kubernetes manifest validates offline: built-in kinds against the Kubernetes schemas
(kubernetes-validate, strict), CRDs as objects and as structural schemas, custom resources
against their CRD's openAPIV3Schema (jsonschema), and the waypoint renderer's output too."""

from __future__ import annotations

import copy
import functools
import re
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from config.kube_source import WATCHED
from config.kube_waypoint import (
    GATEWAY_NAME_LABEL,
    OBJECT_PATHS,
    WaypointSettings,
    port_name,
    render_waypoint,
)
from config.resources import FieldError
from config.store import Store
from config.validate import Document

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
# The oldest Kubernetes release the manifests support (securityContext.appArmorProfile
# is 1.30+) and the newest the schemas know.
VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())


@functools.cache
def _load(path: Path) -> tuple[dict[str, Any], ...]:
    return tuple(d for d in yaml.safe_load_all(path.read_text()) if d is not None)


def _docs(path: Path) -> list[dict[str, Any]]:
    return [copy.deepcopy(d) for d in _load(path)]


def _manifest_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml")


def _all_docs() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{p.relative_to(DEPLOY)}#{i + 1}", d)
        for p in _manifest_files()
        for i, d in enumerate(_docs(p))
    ]


@functools.cache
def _crds() -> dict[tuple[str, str], dict[str, Any]]:
    """(group, kind) -> CRD object, from deploy/kubernetes/crds."""
    out = {}
    for p in sorted((DEPLOY / "crds").glob("*.yaml")):
        for d in _docs(p):
            assert d["kind"] == "CustomResourceDefinition", p
            out[(d["spec"]["group"], d["spec"]["names"]["kind"])] = d
    return out


def _group(api_version: str) -> str:
    return api_version.rpartition("/")[0]


def _is_builtin(obj: Mapping[str, Any]) -> bool:
    return (_group(obj["apiVersion"]), obj["kind"]) not in _crds()


def _strict_json_schema(schema: Any) -> Any:
    """CRD openAPIV3Schema -> JSON Schema that also refuses unknown fields (like
    `kubectl apply --validate=strict`) and accepts int-or-string fields."""
    if isinstance(schema, list):
        return [_strict_json_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {
        k: _strict_json_schema(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")
    }
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


_OBJECT_META = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "required": ["name"],
    "additionalProperties": False,
}


def validate_custom_resource(obj: Mapping[str, Any]) -> None:
    crd = _crds()[(_group(obj["apiVersion"]), obj["kind"])]
    version = obj["apiVersion"].rpartition("/")[2]
    served = {v["name"]: v for v in crd["spec"]["versions"] if v["served"]}
    assert version in served, f"{obj['kind']} {version} is not served by its CRD"
    schema = _strict_json_schema(copy.deepcopy(served[version]["schema"]["openAPIV3Schema"]))
    schema.setdefault("properties", {}).update(
        {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": _OBJECT_META}
    )
    schema["additionalProperties"] = False
    jsonschema.validate(obj, schema, cls=jsonschema.Draft4Validator)


def _walk(schema: Mapping[str, Any], path: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


# -- built-in kinds ----------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_builtin_kinds_validate_against_the_kubernetes_schemas(version: str) -> None:
    checked = 0
    for where, obj in _all_docs():
        if not _is_builtin(obj):
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(
                f"{where} ({obj['kind']} {obj['metadata'].get('name')}) is not valid "
                f"for Kubernetes {version}: {e.message} at {list(e.path)}"
            )
        checked += 1
    # namespace, CRDs (9), GatewayClass CRD objects, SA x2, RBAC x2, PVC, Deployment,
    # Service, DaemonSet, examples' Namespace and Service
    assert checked >= 18


def test_a_broken_manifest_is_caught() -> None:
    """The check above is not vacuous."""
    ds = next(d for _, d in _all_docs() if d["kind"] == "DaemonSet")
    bad = copy.deepcopy(ds)
    bad["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"] = (
        "NET_ADMIN"
    )
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)
    typo = copy.deepcopy(ds)
    typo["spec"]["template"]["spec"]["hostNetworking"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, VERSIONS[-1], strict=True)


# -- CRDs and custom resources -----------------------------------------------------------


def test_crd_schemas_are_structural() -> None:
    """Every node has a type (Kubernetes refuses non-structural v1 CRD schemas)."""
    for (group, kind), crd in _crds().items():
        versions = crd["spec"]["versions"]
        assert sum(1 for v in versions if v["storage"]) == 1, f"{kind}: one storage version"
        for v in versions:
            root = v["schema"]["openAPIV3Schema"]
            for path, node in _walk(root, kind):
                if node.get("x-kubernetes-int-or-string"):
                    continue
                assert "type" in node, f"{group}/{kind} {v['name']}: {path} has no type"
                if node["type"] == "array":
                    assert "items" in node, f"{kind}: {path} is an array without items"
                for rule in node.get("x-kubernetes-validations", ()):
                    assert rule.get("rule") and rule.get("message"), path
            for pattern in [n["pattern"] for _, n in _walk(root, kind) if "pattern" in n]:
                re.compile(pattern)
        assert crd["metadata"]["name"] == f"{crd['spec']['names']['plural']}.{group}"


def test_custom_resources_validate_against_their_crds() -> None:
    checked = 0
    for where, obj in _all_docs():
        if _is_builtin(obj):
            continue
        try:
            validate_custom_resource(obj)
        except jsonschema.ValidationError as e:
            pytest.fail(f"{where} ({obj['kind']}): {e.message} at {list(e.absolute_path)}")
        checked += 1
    assert checked >= 10


def test_custom_resource_schema_catches_mistakes() -> None:
    gw = next(d for _, d in _all_docs() if d["kind"] == "Gateway")
    bad = copy.deepcopy(gw)
    bad["spec"]["listeners"][0]["port"] = 70000
    with pytest.raises(jsonschema.ValidationError, match="70000"):
        validate_custom_resource(bad)
    typo = copy.deepcopy(gw)
    typo["spec"]["gatewayClass"] = "istio-waypoint"
    with pytest.raises(jsonschema.ValidationError, match="gatewayClass"):
        validate_custom_resource(typo)
    ap = next(d for _, d in _all_docs() if d["kind"] == "AuthorizationPolicy")
    wrong = copy.deepcopy(ap)
    wrong["spec"]["action"] = "MAYBE"
    with pytest.raises(jsonschema.ValidationError, match="MAYBE"):
        validate_custom_resource(wrong)


def test_examples_are_accepted_by_the_control_plane_too() -> None:
    docs = [
        Document(str(p), i + 1, d)
        for p in sorted((DEPLOY / "examples").glob("*.yaml"))
        for i, d in enumerate(_docs(p))
    ]
    with tempfile.TemporaryDirectory() as tmp, Store(tmp) as store:
        results = store.apply(docs, dry_run=True)
    assert len(results) == len(docs)


def test_every_watched_kind_has_a_crd_or_is_builtin_and_rbac_allows_watching_it() -> None:
    crds = _crds()
    role = next(
        d
        for _, d in _all_docs()
        if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "ambit-control-plane"
    )
    granted: set[tuple[str, str, str]] = {
        (g, r, v)
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    for wk in WATCHED:
        parts = wk.path.strip("/").split("/")
        group = "" if parts[0] == "api" else parts[1]
        plural = parts[-1]
        for verb in ("list", "watch"):
            assert (group, plural, verb) in granted, f"ClusterRole lacks {verb} {group}/{plural}"
        if group not in ("", "discovery.k8s.io"):
            crd = crds.get((group, wk.kind))
            assert crd is not None, f"no CRD for {group}/{wk.kind}"
            assert crd["spec"]["names"]["plural"] == plural
            version = parts[2]
            assert any(v["name"] == version and v["served"] for v in crd["spec"]["versions"])


def test_rbac_allows_the_waypoint_deployer_to_apply_what_it_renders() -> None:
    role = next(d for _, d in _all_docs() if d["kind"] == "ClusterRole")
    granted = {
        (g, r, v)
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    for kind, template in OBJECT_PATHS.items():
        parts = template.strip("/").split("/")
        group = "" if parts[0] == "api" else parts[1]
        plural = parts[-2]
        assert (group, plural, "patch") in granted, f"ClusterRole cannot apply {kind}"


def test_ztunnel_daemonset_has_what_capture_needs_and_nothing_more() -> None:
    ds = next(d for _, d in _all_docs() if d["kind"] == "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["hostPID"] is True
    c = pod["containers"][0]
    sc = c["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["netns"]["mountPath"] == "/var/run/netns"
    assert mounts["netns"]["mountPropagation"] == "HostToContainer"
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["netns"]["hostPath"]["path"] == "/var/run/netns"
    assert vols["token"]["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "ambit"
    ru = ds["spec"]["updateStrategy"]["rollingUpdate"]
    assert ru == {"maxSurge": 1, "maxUnavailable": 0}, "upgrades must overlap old and new"
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021}
    drain = next(float(a.split("=", 1)[1]) for a in c["args"] if a.startswith("--drain-timeout"))
    assert 0 < drain < pod["terminationGracePeriodSeconds"], "drain must end before SIGKILL"


def _pod_templates() -> list[tuple[str, dict[str, Any]]]:
    out = [(where, d["spec"]["template"]["spec"]) for where, d in _all_docs()
           if d["kind"] in ("Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job")]
    out += [("rendered-waypoint", o["spec"]["template"]["spec"])
            for o in render_waypoint(_gateway()) if o["kind"] == "Deployment"]
    return out


def test_host_network_pods_declare_no_ports() -> None:
    """hostNetwork turns every containerPort into a hostPort: a second pod on the node
    (the surge pod of a maxSurge upgrade) could never be scheduled."""
    host_network = [(w, p) for w, p in _pod_templates() if p.get("hostNetwork")]
    assert host_network, "the ztunnel DaemonSet runs in the node's network namespace"
    for where, pod in host_network:
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            assert not c.get("ports"), f"{where}/{c['name']} declares ports {c['ports']}"


def _containers() -> list[tuple[str, dict[str, Any]]]:
    out = [(f"{where}/{c['name']}", c) for where, d in _all_docs()
           if d["kind"] in ("Deployment", "DaemonSet")
           for c in d["spec"]["template"]["spec"]["containers"]]
    out += [(f"rendered-waypoint/{c['name']}", c) for o in render_waypoint(_gateway())
            if o["kind"] == "Deployment" for c in o["spec"]["template"]["spec"]["containers"]]
    return out


def _parse_strictly(container: Mapping[str, Any]) -> Any:
    """The container's args through the real parser of its command: an unknown or
    malformed option fails here as it would make the pod crash-loop."""
    from config.cli import build_parser as ambit_parser
    from waypoint.cli import build_parser as waypoint_parser
    from ztunnel.cli import build_parser as ztunnel_parser

    parsers = {"ambit": ambit_parser, "ztunnel": ztunnel_parser, "waypoint": waypoint_parser}
    parser = parsers[container["command"][0]]()
    try:
        return parser.parse_args(container["args"])
    except SystemExit as e:
        raise AssertionError(
            f"{container['name']}: {container['command'] + container['args']} "
            f"does not parse (exit {e.code})") from None


def test_every_container_command_line_is_checked() -> None:
    assert sorted(where.rsplit("/", 1)[1] for where, _ in _containers()) == [
        "control-plane", "waypoint", "ztunnel"]


@pytest.mark.parametrize(
    "where",
    [
        "control-plane.yaml#5/control-plane",
        "ztunnel.yaml#2/ztunnel",
        "rendered-waypoint/waypoint",
    ],
)
def test_container_command_lines_parse_with_the_real_parsers(where: str) -> None:
    containers = dict(_containers())
    assert where in containers, f"no container {where}: have {sorted(containers)}"
    _parse_strictly(containers[where])


def test_control_plane_deployment_runs_the_kubernetes_source() -> None:
    c = dict(_containers())["control-plane.yaml#5/control-plane"]
    args = _parse_strictly(c)
    assert args.command == "control-plane"
    assert args.source == "kubernetes" and args.kubeconfig is None  # in-cluster credentials
    assert args.waypoint_image == c["image"]


def test_strict_parsing_refuses_an_unknown_option() -> None:
    c = copy.deepcopy(dict(_containers())["control-plane.yaml#5/control-plane"])
    c["args"].append("--sourcce=kubernetes")
    with pytest.raises(AssertionError, match="does not parse"):
        _parse_strictly(c)


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    wanted = {str(p.relative_to(DEPLOY)) for p in _manifest_files() if "examples" not in p.parts}
    assert listed == wanted


# -- the waypoint renderer ---------------------------------------------------------------


def _gateway(**spec_extra: Any) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {
            "name": "waypoint",
            "namespace": "shop",
            "uid": "0b6f1c1e-4a59-4d4e-9a55-3c2b7d0f3e11",
        },
        "spec": {
            "gatewayClassName": "istio-waypoint",
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
            **spec_extra,
        },
    }


@pytest.mark.parametrize("replicas", [1, 3])
def test_rendered_waypoint_objects_validate(replicas: int) -> None:
    objs = render_waypoint(_gateway(), WaypointSettings(replicas=replicas))
    kinds = [o["kind"] for o in objs]
    assert kinds[:3] == ["ServiceAccount", "Deployment", "Service"]
    assert ("PodDisruptionBudget" in kinds) == (replicas > 1)
    for obj in objs:
        for version in VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_rendered_waypoint_is_owned_by_its_gateway_and_serves_its_listeners() -> None:
    gw = _gateway(
        infrastructure={"labels": {"team": "shop"}, "annotations": {"owner": "shop-team"}}
    )
    sa, dep, svc = render_waypoint(gw, WaypointSettings(image="ambit/ambit:9.9"))
    for obj in (sa, dep, svc):
        md = obj["metadata"]
        assert (md["name"], md["namespace"]) == ("waypoint", "shop")
        assert md["labels"][GATEWAY_NAME_LABEL] == "waypoint"
        assert md["labels"]["team"] == "shop"
        assert md["annotations"] == {"owner": "shop-team"}
        ref = md["ownerReferences"][0]
        assert (ref["kind"], ref["uid"], ref["controller"]) == (
            "Gateway",
            gw["metadata"]["uid"],
            True,
        )
    pod = dep["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "waypoint"
    c = pod["containers"][0]
    assert c["image"] == "ambit/ambit:9.9"
    assert "--gateway=shop/waypoint" in c["args"]
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert dep["spec"]["template"]["metadata"]["labels"]["istio.io/dataplane-mode"] == "none"
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    ports = {p["port"]: p for p in svc["spec"]["ports"]}
    assert ports[15008]["appProtocol"] == "all" and ports[15008]["name"] == "mesh"
    assert 15021 in ports
    assert "clusterIP" not in svc["spec"]


def test_gateway_address_becomes_the_service_vip_and_odd_listener_names_are_fixed() -> None:
    gw = _gateway(
        addresses=[{"type": "IPAddress", "value": "10.96.5.5"}],
        listeners=[{"name": "Very_Long_Listener_Name", "port": 15008, "protocol": "HBONE"}],
    )
    _, dep, svc = render_waypoint(gw)
    assert svc["spec"]["clusterIP"] == "10.96.5.5"
    assert svc["spec"]["ports"][0]["name"] == "l15008"
    assert dep["spec"]["template"]["spec"]["containers"][0]["ports"][0]["name"] == "l15008"
    kubernetes_validate.validate(dep, VERSIONS[-1], strict=True)
    assert port_name("mesh", 15008) == "mesh"
    assert port_name("status-port", 1) == "l1"


def test_render_refuses_a_gateway_of_another_class() -> None:
    gw = _gateway()
    gw["spec"]["gatewayClassName"] = "nginx"
    with pytest.raises(FieldError, match="gatewayClassName"):
        render_waypoint(gw)
