"""The Kubernetes objects the control plane creates for each waypoint Gateway (pure renderer).

For a `Gateway` of class `istio-waypoint` named NAME in namespace NS:

- ServiceAccount NS/NAME: the waypoint's identity is
  `spiffe://<trust-domain>/ns/NS/sa/NAME`, as in Istio;
- Deployment NS/NAME running `waypoint --gateway NS/NAME`, with a projected
  ServiceAccount token (audience `ambit`) as its credential for the control plane, a
  readiness probe on 15021, no capabilities, read-only root filesystem, and a rolling
  update that brings the new pod up before the old one drains (maxUnavailable 0);
- Service NS/NAME with one port per Gateway listener (15008 HBONE) and the status port:
  its ClusterIP is the waypoint address ztunnels send to;
- a PodDisruptionBudget when more than one replica runs.

Every object carries the label `gateway.networking.k8s.io/gateway-name`, the Gateway's
`spec.infrastructure` labels and annotations, and an owner reference to the Gateway
(when it has a uid) so deleting the Gateway deletes them.

    objs = render_waypoint(gateway_manifest, WaypointSettings(image="ambit/ambit:0.1.0"))
"""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog
import yaml

from config.resources import FieldError, GatewaySpec, parse_resource

log = structlog.get_logger("ambit.waypoints")

GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
MANAGED_BY = "ambit-control-plane"
TOKEN_AUDIENCE = "ambit"
TOKEN_DIR = "/var/run/secrets/ambit"
STATUS_PORT = 15021
METRICS_PORT = 15020
_APP_PROTOCOL = {"HBONE": "all", "HTTP": "http", "TCP": "tcp"}


@dataclass(frozen=True)
class WaypointSettings:
    """What the operator configures once for every waypoint the control plane creates."""

    image: str = "ambit/ambit:0.1.0"
    control_plane: str = "ambit-control-plane.ambit-system.svc:15012"
    replicas: int = 1
    cpu_request: str = "100m"
    memory_request: str = "128Mi"
    memory_limit: str = "1Gi"
    termination_grace_seconds: int = 45


_IANA_SVC_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([a-z0-9]|-(?!-))*$")
_RESERVED_PORT_NAMES = ("http-metrics", "status-port")


def port_name(listener: str, port: int) -> str:
    """A container/Service port name for a listener: its own name when it is a valid
    IANA service name (at most 15 characters), else `l<port>`."""
    name = listener.lower()
    if (len(name) <= 15 and _IANA_SVC_NAME.match(name) and not name.endswith("-")
            and name not in _RESERVED_PORT_NAMES):
        return name
    return f"l{port}"


def _labels(name: str, extra: Mapping[str, str]) -> dict[str, str]:
    return {
        **extra,
        GATEWAY_NAME_LABEL: name,
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/component": "waypoint",
        "app.kubernetes.io/part-of": "ambit",
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }


def render_waypoint(gateway: Mapping[str, Any],
                    settings: WaypointSettings = WaypointSettings()) -> list[dict[str, Any]]:
    """ServiceAccount, Deployment, Service (and PodDisruptionBudget) for one waypoint Gateway.

    Raises config.resources.FieldError when `gateway` is not a valid waypoint Gateway.
    """
    res = parse_resource(dict(gateway))
    spec = res.spec
    if not isinstance(spec, GatewaySpec):
        raise FieldError("kind", f"expected a Gateway, got {res.kind}")
    name, ns = res.meta.name, res.meta.namespace
    raw_spec = gateway.get("spec") or {}
    infra = raw_spec.get("infrastructure") or {}
    infra_labels = {str(k): str(v) for k, v in (infra.get("labels") or {}).items()}
    infra_annotations = {str(k): str(v) for k, v in (infra.get("annotations") or {}).items()}
    labels = _labels(name, infra_labels)
    selector = {GATEWAY_NAME_LABEL: name}

    def meta() -> dict[str, Any]:
        m: dict[str, Any] = {"name": name, "namespace": ns, "labels": dict(labels)}
        if infra_annotations:
            m["annotations"] = dict(infra_annotations)
        uid = (gateway.get("metadata") or {}).get("uid")
        if uid:
            m["ownerReferences"] = [{
                "apiVersion": res.api_version, "kind": "Gateway", "name": name, "uid": uid,
                "controller": True, "blockOwnerDeletion": True}]
        return m

    service_account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta()}

    listener_ports = [{"name": port_name(lst.name, lst.port), "containerPort": lst.port,
                       "protocol": "TCP"} for lst in spec.listeners]
    container: dict[str, Any] = {
        "name": "waypoint",
        "image": settings.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["waypoint"],
        "args": [f"--gateway={ns}/{name}", f"--control-plane={settings.control_plane}",
                 f"--token-file={TOKEN_DIR}/token"],
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        ],
        "ports": [*listener_ports,
                  {"name": "http-metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
                  {"name": "status-port", "containerPort": STATUS_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": STATUS_PORT},
                           "periodSeconds": 2, "failureThreshold": 2},
        "resources": {"requests": {"cpu": settings.cpu_request,
                                   "memory": settings.memory_request},
                      "limits": {"memory": settings.memory_limit}},
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "token", "mountPath": TOKEN_DIR, "readOnly": True},
                         {"name": "tmp", "mountPath": "/tmp"}],
    }
    pod_labels = {**labels, "istio.io/dataplane-mode": "none"}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(),
        "spec": {
            "replicas": settings.replicas,
            "selector": {"matchLabels": dict(selector)},
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    "annotations": {**infra_annotations, "prometheus.io/scrape": "true",
                                    "prometheus.io/port": str(METRICS_PORT),
                                    "prometheus.io/path": "/metrics"},
                },
                "spec": {
                    "serviceAccountName": name,
                    "automountServiceAccountToken": False,
                    "terminationGracePeriodSeconds": settings.termination_grace_seconds,
                    "securityContext": {"runAsNonRoot": True,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [container],
                    "volumes": [
                        {"name": "token", "projected": {"sources": [{"serviceAccountToken": {
                            "path": "token", "audience": TOKEN_AUDIENCE,
                            "expirationSeconds": 3600}}]}},
                        {"name": "tmp", "emptyDir": {}},
                    ],
                },
            },
        },
    }
    service_ports = [{"name": p["name"], "port": lst.port, "targetPort": lst.port,
                      "protocol": "TCP", "appProtocol": _APP_PROTOCOL.get(lst.protocol, "tcp")}
                     for p, lst in zip(listener_ports, spec.listeners, strict=True)]
    service_ports.append({"name": "status-port", "port": STATUS_PORT, "targetPort": STATUS_PORT,
                          "protocol": "TCP"})
    service: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(),
        "spec": {"type": "ClusterIP", "selector": dict(selector), "ports": service_ports},
    }
    if spec.addresses:
        service["spec"]["clusterIP"] = spec.addresses[0]
    out: list[dict[str, Any]] = [service_account, deployment, service]
    if settings.replicas > 1:
        out.append({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                    "metadata": meta(),
                    "spec": {"minAvailable": 1, "selector": {"matchLabels": dict(selector)}}})
    return out


def render_yaml(gateway: Mapping[str, Any],
                settings: WaypointSettings = WaypointSettings()) -> str:
    return yaml.safe_dump_all(render_waypoint(gateway, settings), sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    """`python -m config.kube_waypoint GATEWAY.yaml`: print what the control plane creates."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m config.kube_waypoint GATEWAY.yaml", file=sys.stderr)
        return 2
    try:
        with open(args[0], encoding="utf-8") as f:
            docs = [d for d in yaml.safe_load_all(f) if isinstance(d, dict)
                    and d.get("kind") == "Gateway"]
        if not docs:
            print(f"{args[0]}: no Gateway in the file", file=sys.stderr)
            return 1
        sys.stdout.write("---\n".join(render_yaml(d) for d in docs))
    except (OSError, yaml.YAMLError) as e:
        print(f"{args[0]}: {e}", file=sys.stderr)
        return 1
    except FieldError as e:
        print(f"{args[0]}: {e.path}: {e.message}", file=sys.stderr)
        return 1
    return 0



# ---------------------------------------------------------------------------------------
# applying to the cluster
# ---------------------------------------------------------------------------------------

FIELD_MANAGER = "ambit-control-plane"
OBJECT_PATHS = {
    "ServiceAccount": "/api/v1/namespaces/{ns}/serviceaccounts/{name}",
    "Service": "/api/v1/namespaces/{ns}/services/{name}",
    "Deployment": "/apis/apps/v1/namespaces/{ns}/deployments/{name}",
    "PodDisruptionBudget": "/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets/{name}",
}


def object_path(obj: Mapping[str, Any], *, status: bool = False) -> str:
    """The API path of a namespaced object (`status=True`: its status subresource)."""
    md = obj["metadata"]
    if obj["kind"] == "Gateway":
        version = str(obj.get("apiVersion", "gateway.networking.k8s.io/v1"))
        path = f"/apis/{version}/namespaces/{md['namespace']}/gateways/{md['name']}"
    else:
        path = OBJECT_PATHS[obj["kind"]].format(ns=md["namespace"], name=md["name"])
    return path + "/status" if status else path


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def gateway_status(gateway: Mapping[str, Any], address: str, now: str) -> dict[str, Any]:
    """The Gateway status the controller reports (server-side applied to /status):
    Accepted, and Programmed once its Service has an address (as Istio reports)."""
    md = gateway.get("metadata") or {}
    gen = int(md.get("generation") or 0)

    def cond(typ: str, ok: bool, reason: str, message: str) -> dict[str, Any]:
        c: dict[str, Any] = {"type": typ, "status": "True" if ok else "False",
                             "reason": reason, "message": message, "lastTransitionTime": now}
        if gen:
            c["observedGeneration"] = gen
        return c

    status: dict[str, Any] = {"conditions": [
        cond("Accepted", True, "Accepted", "waypoint managed by " + MANAGED_BY),
        cond("Programmed", bool(address), "Programmed" if address else "Pending",
             f"waypoint Service has address {address}" if address
             else "waypoint Service has no address yet"),
    ]}
    if address:
        status["addresses"] = [{"type": "IPAddress", "value": address}]
    return {"apiVersion": gateway.get("apiVersion", "gateway.networking.k8s.io/v1"),
            "kind": "Gateway", "metadata": {"name": md.get("name"),
                                            "namespace": md.get("namespace")},
            "status": status}


def is_waypoint_gateway(obj: Mapping[str, Any]) -> bool:
    return bool((obj.get("spec") or {}).get("gatewayClassName") == "istio-waypoint")


class WaypointDeployer:
    """Server-side applies the rendered objects of every waypoint Gateway.

    `sync(api, gateways)` applies what changed since the last successful apply (by
    content), as field manager `ambit-control-plane` with `force=true` (the control plane
    owns these objects), then the Gateway's status (Accepted, Programmed, addresses).
    Objects of deleted Gateways are removed by Kubernetes' garbage
    collector through their owner reference. A Gateway that fails to apply is retried on
    the next sync and listed in `errors`.
    """

    def __init__(self, settings: WaypointSettings = WaypointSettings()) -> None:
        self.settings = settings
        self.applied: dict[tuple[str, str], str] = {}  # gateway -> digest of what was applied
        self.errors: dict[str, str] = {}
        self.applies = 0

    async def sync(self, api: Any, gateways: Iterable[Mapping[str, Any]]) -> None:
        seen: set[tuple[str, str]] = set()
        for gw in gateways:
            if not is_waypoint_gateway(gw):
                continue
            md = gw.get("metadata") or {}
            key = (str(md.get("namespace") or ""), str(md.get("name") or ""))
            seen.add(key)
            label = f"{key[0]}/{key[1]}"
            try:
                objs = render_waypoint(gw, self.settings)
            except FieldError as e:
                self.errors[label] = f"{e.path}: {e.message}"
                continue
            digest = json.dumps(objs, sort_keys=True)
            if self.applied.get(key) == digest:
                continue
            try:
                address = ""
                for obj in objs:
                    stored = await self._apply(api, object_path(obj), obj)
                    if obj["kind"] == "Service":
                        address = str((stored.get("spec") or {}).get("clusterIP") or "")
                await self._apply(api, object_path(gw, status=True),
                                  gateway_status(gw, address, _now()))
            except WaypointApplyError as e:
                self.errors[label] = str(e)
                self.applied.pop(key, None)
                log.warning("waypoint objects not applied, retrying on the next change",
                            gateway=label, error=str(e))
                continue
            self.errors.pop(label, None)
            self.applied[key] = digest
            log.info("waypoint objects applied", gateway=label,
                     objects=[f"{o['kind']}/{o['metadata']['name']}" for o in objs])
        for key in set(self.applied) - seen:
            del self.applied[key]

    async def _apply(self, api: Any, path: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        try:
            resp = await api.call_api(
                path, "PATCH",
                query_params=[("fieldManager", FIELD_MANAGER), ("force", "true")],
                header_params={"Content-Type": "application/apply-patch+yaml",
                               "Accept": "application/json"},
                body=dict(obj), auth_settings=["BearerToken"], _preload_content=False,
                _request_timeout=aiohttp.ClientTimeout(total=30))
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise WaypointApplyError(f"PATCH {path}: {type(e).__name__}: {e}") from None
        try:
            text = await resp.read()
        finally:
            resp.release()
        self.applies += 1
        if not 200 <= resp.status < 300:
            try:
                msg = str(json.loads(text).get("message", ""))
            except (ValueError, AttributeError):
                msg = text[:200].decode(errors="replace")
            hint = (": check that the ClusterRole ambit-control-plane may patch "
                    f"{obj['kind']} objects" if resp.status in (401, 403) else "")
            raise WaypointApplyError(f"PATCH {path} answered {resp.status} {msg}{hint}")
        try:
            out = json.loads(text)
        except ValueError:
            return {}
        return out if isinstance(out, dict) else {}


class WaypointApplyError(Exception):
    """The API server refused or could not be reached for a waypoint object."""


if __name__ == "__main__":
    raise SystemExit(main())
