"""Table of bad manifests and the exact error each one gets (nothing is applied)."""
# ruff: noqa: E501  (the table keeps each manifest and its exact error on one line)

from __future__ import annotations

import pytest

from config.resources import ResourceKey
from config.validate import ValidationFailed, load_text, validate_batch

# (case id, manifest, exact error shown to the operator)
CASES: list[tuple[str, str, str]] = [
    (
        "unknown_kind",
        "apiVersion: v1\nkind: Deployment\nmetadata: {name: x}\n",
        "t.yaml: document 1 (Deployment default/x): kind: unknown kind 'Deployment' (expected one of: Namespace, WorkloadEntry, Service, AuthorizationPolicy, PeerAuthentication, Gateway, HTTPRoute, DestinationRule, HTTPFault, RateLimit)",
    ),
    (
        "pod_kind",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n",
        "t.yaml: document 1 (Pod default/x): kind: Pods come from the Kubernetes API source; outside Kubernetes describe the workload as a WorkloadEntry",
    ),
    (
        "wrong_api_version",
        "apiVersion: networking.istio.io/v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: [{port: 80}]}\n",
        "t.yaml: document 1 (Service default/x): apiVersion: Service is served as v1, got 'networking.istio.io/v1'",
    ),
    (
        "missing_kind",
        "apiVersion: v1\nmetadata: {name: x}\n",
        "t.yaml: document 1 (? default/x): kind: required field is missing",
    ),
    (
        "missing_name",
        "apiVersion: v1\nkind: Namespace\nmetadata: {labels: {a: b}}\n",
        "t.yaml: document 1 (Namespace ?): metadata.name: required field is missing",
    ),
    (
        "bad_name",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: Bad_Name}\n",
        "t.yaml: document 1 (Namespace Bad_Name): metadata.name: 'Bad_Name' is not a valid name: use lowercase letters, digits, '-' and '.', starting and ending with a letter or digit",
    ),
    (
        "not_a_mapping",
        "- just\n- a list\n",
        "t.yaml: document 1: expected a manifest (a mapping with apiVersion, kind and metadata), got a list",
    ),
    (
        "unknown_top_field",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\nspce: {}\n",
        "t.yaml: document 1 (Namespace x): spce: unknown field (expected one of: apiVersion, kind, metadata, spec, status)",
    ),
    (
        "namespace_on_cluster_scoped",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: x, namespace: y}\n",
        "t.yaml: document 1 (Namespace x): metadata.namespace: Namespace is cluster-scoped: remove the namespace",
    ),
    (
        "label_value_not_string",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {ready: true}}\n",
        "t.yaml: document 1 (Namespace x): metadata.labels.ready: label 'ready' must be a string, got a boolean",
    ),
    (
        "bad_dataplane_mode",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {istio.io/dataplane-mode: sidecar}}\n",
        "t.yaml: document 1 (Namespace x): metadata.labels.istio.io/dataplane-mode: expected 'ambient' or 'none', got 'sidecar'",
    ),
    (
        "missing_namespace",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: nowhere}\nspec: {ports: [{port: 80}]}\n",
        "t.yaml: document 1 (Service nowhere/web): metadata.namespace: namespace 'nowhere' does not exist: create it (kind Namespace) first or in the same apply",
    ),
    (
        "svc_port_range",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 70000}]}\n",
        "t.yaml: document 1 (Service default/web): spec.ports[0].port: expected a port number 1-65535, got 70000",
    ),
    (
        "svc_port_string",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: http}]}\n",
        "t.yaml: document 1 (Service default/web): spec.ports[0].port: expected a port number 1-65535, got a string",
    ),
    (
        "svc_no_ports",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {selector: {app: web}}\n",
        "t.yaml: document 1 (Service default/web): spec.ports: required field is missing",
    ),
    (
        "svc_unnamed_multi_port",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80, name: http}, {port: 81}]}\n",
        "t.yaml: document 1 (Service default/web): spec.ports[1].name: required when a Service has more than one port",
    ),
    (
        "svc_duplicate_port",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80, name: a}, {port: 80, name: b}]}\n",
        "t.yaml: document 1 (Service default/web): spec.ports[1].port: duplicate port 80/TCP",
    ),
    (
        "svc_bad_cluster_ip",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}\n",
        "t.yaml: document 1 (Service default/web): spec.clusterIP: expected an IPv4 or IPv6 address, got '10.96.0.300'",
    ),
    (
        "svc_bad_target_port",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80, targetPort: Not_A_Name}]}\n",
        "t.yaml: document 1 (Service default/web): spec.ports[0].targetPort: expected a port number or a port name (at most 15 lowercase letters, digits, '-'), got 'Not_A_Name'",
    ),
    (
        "svc_type_nodeport",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {type: NodePort, ports: [{port: 80}]}\n",
        "t.yaml: document 1 (Service default/web): spec.type: expected one of ClusterIP, got 'NodePort'",
    ),
    (
        "we_missing_address",
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: w}\nspec: {labels: {app: web}}\n",
        "t.yaml: document 1 (WorkloadEntry default/w): spec.address: required field is missing (the workload's IP address)",
    ),
    (
        "we_bad_address",
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: w}\nspec: {address: 10.0.0.256}\n",
        "t.yaml: document 1 (WorkloadEntry default/w): spec.address: expected an IPv4 or IPv6 address, got '10.0.0.256'",
    ),
    (
        "we_negative_weight",
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: w}\nspec: {address: 10.0.0.5, weight: -1}\n",
        "t.yaml: document 1 (WorkloadEntry default/w): spec.weight: expected an integer 0-4294967295, got -1",
    ),
    (
        "we_bad_port",
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: w}\nspec: {address: 10.0.0.5, ports: {http: 0}}\n",
        "t.yaml: document 1 (WorkloadEntry default/w): spec.ports.http: expected a port number 1-65535, got 0",
    ),
    (
        "ap_bad_ipblock",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  rules:\n  - from:\n    - source: {ipBlocks: [10.0.0.0/8, 10.1.2.0/33]}\n",
        "t.yaml: document 1 (AuthorizationPolicy default/p): spec.rules[0].from[0].source.ipBlocks[1]: expected an IP address or CIDR like 10.0.0.0/8, got '10.1.2.0/33'",
    ),
    (
        "ap_bad_action",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {action: REJECT}\n",
        "t.yaml: document 1 (AuthorizationPolicy default/p): spec.action: expected ALLOW or DENY, got 'REJECT'",
    ),
    (
        "ap_custom_action",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {action: CUSTOM}\n",
        "t.yaml: document 1 (AuthorizationPolicy default/p): spec.action: CUSTOM is not supported: use ALLOW or DENY",
    ),
    (
        "ap_selector_and_targetrefs",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  selector: {matchLabels: {app: web}}\n  targetRefs: [{kind: Service, group: '', name: web}]\n",
        "t.yaml: document 1 (AuthorizationPolicy default/p): spec.targetRefs: set either selector or targetRefs, not both",
    ),
    (
        "ap_typo_field",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  rules:\n  - from:\n    - source: {principal: [a]}\n",
        "t.yaml: document 1 (AuthorizationPolicy default/p): spec.rules[0].from[0].source.principal: unknown field (expected one of: ipBlocks, namespaces, notIpBlocks, notNamespaces, notPrincipals, notRemoteIpBlocks, notRequestPrincipals, principals, remoteIpBlocks, requestPrincipals)",
    ),
    (
        "ap_bad_port",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  rules:\n  - to:\n    - operation: {ports: ['8080', '99999']}\n",
        "t.yaml: document 1 (AuthorizationPolicy default/p): spec.rules[0].to[0].operation.ports[1]: expected a port number 1-65535, got 99999",
    ),
    (
        "ap_principals_not_list",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  rules:\n  - from:\n    - source: {principals: cluster.local/ns/a/sa/b}\n",
        "t.yaml: document 1 (AuthorizationPolicy default/p): spec.rules[0].from[0].source.principals: expected a list, got a string",
    ),
    (
        "ap_bad_wildcard",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  rules:\n  - from:\n    - source: {namespaces: ['a*b']}\n",
        "t.yaml: document 1 (AuthorizationPolicy default/p): spec.rules[0].from[0].source.namespaces[0]: 'a*b': '*' is only allowed as a whole value, a prefix or a suffix",
    ),
    (
        "ap_bad_condition_key",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  rules:\n  - when:\n    - {key: source.color, values: [red]}\n",
        "t.yaml: document 1 (AuthorizationPolicy default/p): spec.rules[0].when[0].key: unknown condition key 'source.color' (expected e.g. source.ip, source.namespace, destination.port, request.headers[name])",
    ),
    (
        "ap_condition_without_values",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  rules:\n  - when:\n    - {key: source.ip}\n",
        "t.yaml: document 1 (AuthorizationPolicy default/p): spec.rules[0].when[0]: set values or notValues",
    ),
    (
        "ap_targetref_kind",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  targetRefs: [{kind: Pod, name: web}]\n",
        "t.yaml: document 1 (AuthorizationPolicy default/p): spec.targetRefs[0].kind: expected one of Service, Gateway, GatewayClass, got 'Pod'",
    ),
    (
        "pa_bad_mode",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p}\nspec: {mtls: {mode: STRICTER}}\n",
        "t.yaml: document 1 (PeerAuthentication default/p): spec.mtls.mode: expected one of UNSET, DISABLE, PERMISSIVE, STRICT, got 'STRICTER'",
    ),
    (
        "pa_portlevel_without_selector",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p}\nspec: {portLevelMtls: {'8080': {mode: DISABLE}}}\n",
        "t.yaml: document 1 (PeerAuthentication default/p): spec.portLevelMtls: needs a selector: port-level mTLS applies to selected workloads only",
    ),
    (
        "gw_wrong_class",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: wp}\nspec:\n  gatewayClassName: nginx\n  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n",
        "t.yaml: document 1 (Gateway default/wp): spec.gatewayClassName: unsupported class 'nginx': Ambit implements 'istio-waypoint'",
    ),
    (
        "gw_no_listeners",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: wp}\nspec: {gatewayClassName: istio-waypoint}\n",
        "t.yaml: document 1 (Gateway default/wp): spec.listeners: required field is missing",
    ),
    (
        "gw_duplicate_listener",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: wp}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{name: mesh, port: 15008, protocol: HBONE}, {name: mesh, port: 15009, protocol: HBONE}]\n",
        "t.yaml: document 1 (Gateway default/wp): spec.listeners[1].name: duplicate listener name 'mesh'",
    ),
    (
        "gw_bad_waypoint_for",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: wp, labels: {istio.io/waypoint-for: everything}}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n",
        "t.yaml: document 1 (Gateway default/wp): metadata.labels.istio.io/waypoint-for: expected service, workload, all or none, got 'everything'",
    ),
    (
        "route_no_parents",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  rules: [{backendRefs: [{name: web, port: 80}]}]\n",
        "t.yaml: document 1 (HTTPRoute default/r): spec.parentRefs: required field is missing",
    ),
    (
        "route_bad_regex",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{group: '', kind: Service, name: web}]\n  rules:\n  - matches: [{path: {type: RegularExpression, value: '/v[0-9'}}]\n",
        "t.yaml: document 1 (HTTPRoute default/r): spec.rules[0].matches[0].path.value: invalid regular expression '/v[0-9': unterminated character set at position 2",
    ),
    (
        "route_bad_header_regex",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{group: '', kind: Service, name: web}]\n  rules:\n  - matches: [{headers: [{type: RegularExpression, name: x-user, value: '(*)'}]}]\n",
        "t.yaml: document 1 (HTTPRoute default/r): spec.rules[0].matches[0].headers[0].value: invalid regular expression '(*)': nothing to repeat at position 1",
    ),
    (
        "route_path_without_slash",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{group: '', kind: Service, name: web}]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: api}}]\n",
        "t.yaml: document 1 (HTTPRoute default/r): spec.rules[0].matches[0].path.value: must start with '/', got 'api'",
    ),
    (
        "route_weight_too_big",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{group: '', kind: Service, name: web}]\n  rules:\n  - backendRefs: [{name: v1, port: 80, weight: 90}, {name: v2, port: 80, weight: 2000000}]\n",
        "t.yaml: document 1 (HTTPRoute default/r): spec.rules[0].backendRefs[1].weight: expected an integer 0-1000000, got 2000000",
    ),
    (
        "route_weight_negative",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{group: '', kind: Service, name: web}]\n  rules:\n  - backendRefs: [{name: v1, port: 80, weight: -5}]\n",
        "t.yaml: document 1 (HTTPRoute default/r): spec.rules[0].backendRefs[0].weight: expected an integer 0-1000000, got -5",
    ),
    (
        "route_backend_without_port",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{group: '', kind: Service, name: web}]\n  rules:\n  - backendRefs: [{name: v1}]\n",
        "t.yaml: document 1 (HTTPRoute default/r): spec.rules[0].backendRefs[0].port: required when the backend is a Service",
    ),
    (
        "route_bad_method",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{group: '', kind: Service, name: web}]\n  rules:\n  - matches: [{method: FETCH}]\n",
        "t.yaml: document 1 (HTTPRoute default/r): spec.rules[0].matches[0].method: expected one of GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE, PATCH, got 'FETCH'",
    ),
    (
        "route_bad_timeout",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{group: '', kind: Service, name: web}]\n  rules:\n  - timeouts: {request: 5 seconds}\n",
        "t.yaml: document 1 (HTTPRoute default/r): spec.rules[0].timeouts.request: expected a duration like 1s or 250ms, got '5 seconds'",
    ),
    (
        "route_backend_timeout_longer",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{group: '', kind: Service, name: web}]\n  rules:\n  - timeouts: {request: 1s, backendRequest: 2s}\n",
        "t.yaml: document 1 (HTTPRoute default/r): spec.rules[0].timeouts.backendRequest: must not be longer than timeouts.request",
    ),
    (
        "route_retry_code",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{group: '', kind: Service, name: web}]\n  rules:\n  - retry: {attempts: 3, codes: [503, 200]}\n",
        "t.yaml: document 1 (HTTPRoute default/r): spec.rules[0].retry.codes[1]: expected an integer 400-599, got 200",
    ),
    (
        "route_filter_missing_config",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{group: '', kind: Service, name: web}]\n  rules:\n  - filters: [{type: RequestHeaderModifier}]\n",
        "t.yaml: document 1 (HTTPRoute default/r): spec.rules[0].filters[0].requestHeaderModifier: required when type is RequestHeaderModifier",
    ),
    (
        "route_redirect_and_rewrite",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{group: '', kind: Service, name: web}]\n  rules:\n  - filters:\n    - {type: RequestRedirect, requestRedirect: {statusCode: 301}}\n    - {type: URLRewrite, urlRewrite: {hostname: x}}\n",
        "t.yaml: document 1 (HTTPRoute default/r): spec.rules[0].filters: RequestRedirect and URLRewrite cannot be combined",
    ),
    (
        "route_missing_extension_ref",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{group: '', kind: Service, name: web}]\n  rules:\n  - filters: [{type: ExtensionRef, extensionRef: {group: ambit.dev, kind: HTTPFault, name: slow}}]\n",
        "t.yaml: document 1 (HTTPRoute default/r): spec.rules[0].filters[0].extensionRef: HTTPFault default/slow does not exist: apply it first or in the same apply",
    ),
    (
        "dr_bad_lb",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec: {host: web, trafficPolicy: {loadBalancer: {simple: FASTEST}}}\n",
        "t.yaml: document 1 (DestinationRule default/d): spec.trafficPolicy.loadBalancer.simple: expected one of UNSPECIFIED, ROUND_ROBIN, LEAST_REQUEST, LEAST_CONN, RANDOM, PASSTHROUGH, got 'FASTEST'",
    ),
    (
        "dr_max_ejection",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec: {host: web, trafficPolicy: {outlierDetection: {maxEjectionPercent: 150}}}\n",
        "t.yaml: document 1 (DestinationRule default/d): spec.trafficPolicy.outlierDetection.maxEjectionPercent: expected an integer 0-100, got 150",
    ),
    (
        "dr_zero_connections",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec: {host: web, trafficPolicy: {connectionPool: {tcp: {maxConnections: 0}}}}\n",
        "t.yaml: document 1 (DestinationRule default/d): spec.trafficPolicy.connectionPool.tcp.maxConnections: expected an integer >= 1, got 0",
    ),
    (
        "dr_missing_host",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec: {trafficPolicy: {}}\n",
        "t.yaml: document 1 (DestinationRule default/d): spec.host: required field is missing",
    ),
    (
        "fault_empty",
        "apiVersion: ambit.dev/v1alpha1\nkind: HTTPFault\nmetadata: {name: f}\nspec: {targetRefs: [{kind: Service, name: web}]}\n",
        "t.yaml: document 1 (HTTPFault default/f): spec: set delay, abort or both",
    ),
    (
        "fault_percentage",
        "apiVersion: ambit.dev/v1alpha1\nkind: HTTPFault\nmetadata: {name: f}\nspec: {abort: {httpStatus: 503, percentage: 120}}\n",
        "t.yaml: document 1 (HTTPFault default/f): spec.abort.percentage: expected a number 0-100, got 120",
    ),
    (
        "fault_status",
        "apiVersion: ambit.dev/v1alpha1\nkind: HTTPFault\nmetadata: {name: f}\nspec: {abort: {httpStatus: 99}}\n",
        "t.yaml: document 1 (HTTPFault default/f): spec.abort.httpStatus: expected an integer 200-599, got 99",
    ),
    (
        "ratelimit_zero_tokens",
        "apiVersion: ambit.dev/v1alpha1\nkind: RateLimit\nmetadata: {name: rl}\nspec: {tokenBucket: {maxTokens: 0, fillInterval: 1s}}\n",
        "t.yaml: document 1 (RateLimit default/rl): spec.tokenBucket.maxTokens: expected an integer >= 1, got 0",
    ),
    (
        "ratelimit_zero_interval",
        "apiVersion: ambit.dev/v1alpha1\nkind: RateLimit\nmetadata: {name: rl}\nspec: {tokenBucket: {maxTokens: 10, fillInterval: 0s}}\n",
        "t.yaml: document 1 (RateLimit default/rl): spec.tokenBucket.fillInterval: must be longer than 0s",
    ),
    (
        "duplicate_in_batch",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n",
        "t.yaml: document 2 (Namespace x): metadata.name: duplicate: also defined in t.yaml document 1",
    ),
    (
        "yaml_syntax",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n---\napiVersion: v1\nkind: [Namespace\n",
        "t.yaml: document 2: not valid YAML at line 7, column 1: expected ',' or ']', but got '<stream end>'",
    ),
]


def _exists(key: ResourceKey) -> bool:
    return key == ResourceKey("Namespace", "", "default")


def test_table_has_at_least_30_cases() -> None:
    assert len(CASES) >= 30
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("manifest", "error"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_manifest_is_rejected_with_exact_error(manifest: str, error: str) -> None:
    with pytest.raises(ValidationFailed) as info:
        validate_batch(load_text(manifest, "t.yaml"), _exists)
    assert str(info.value) == error
    assert len(info.value.problems) == 1


def test_every_bad_document_of_a_file_is_reported() -> None:
    text = (
        "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 0}]}\n"
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {ports: [{port: 80}]}\n"
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: c}\nspec: {}\n"
    )
    with pytest.raises(ValidationFailed) as info:
        validate_batch(load_text(text, "svc.yaml"), _exists)
    assert [str(p) for p in info.value.problems] == [
        "svc.yaml: document 1 (Service default/a): spec.ports[0].port: "
        "expected a port number 1-65535, got 0",
        "svc.yaml: document 3 (Service default/c): spec.ports: required field is missing",
    ]


def test_list_items_carry_their_index_in_the_path() -> None:
    text = (
        "apiVersion: v1\nkind: List\nitems:\n"
        "- {apiVersion: v1, kind: Namespace, metadata: {name: ok}}\n"
        "- {apiVersion: v1, kind: Namespace, metadata: {name: Not-OK}}\n"
    )
    with pytest.raises(ValidationFailed) as info:
        validate_batch(load_text(text, "list.yaml"), _exists)
    assert str(info.value).startswith(
        "list.yaml: document 1 (Namespace Not-OK): items[1].metadata.name: 'Not-OK' is not"
    )
