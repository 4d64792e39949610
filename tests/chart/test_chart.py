"""Tests of the embed-url-operator Helm chart.

They render the chart offline with the real Helm v4 engine (the
``helm-python-sdk`` package, imported as ``helm_python``): no cluster, no
``helm`` binary, no network. Run from the repository root:

    python -m pip install -r tests/chart/requirements.txt
    python -m pytest tests/chart -q
"""

from __future__ import annotations

import re
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

import helm_python as helm
import promql_parser
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "charts" / "embed-url-operator"
TOP_LEVEL_CRDS = REPO_ROOT / "crds"
CHART_CRDS = CHART_DIR / "crds"

RELEASE = "rel"
NAMESPACE = "ops"
FULLNAME = "rel-embed-url-operator"
IRSA_ROLE = "arn:aws:iam::123456789012:role/embed-url-operator"

# What the operator's ServiceAccount may do in every namespace it watches,
# keyed by (apiGroup, resource). Nothing more, nothing less.
OPERATOR_PERMISSIONS = {
    ("embedurl.io", "embedurlrequests"): {"get", "list", "watch"},
    ("embedurl.io", "embedurlrequests/status"): {"patch"},
    ("", "secrets"): {"get", "list", "watch", "create", "patch"},
    ("events.k8s.io", "events"): {"create"},
}

# What it may read cluster-wide in every mode: the cluster-scoped
# EmbedUrlPolicies, and namespaces (policies select them by label).
POLICY_READ_PERMISSIONS = {
    ("embedurl.io", "embedurlpolicies"): {"list", "watch"},
    ("", "namespaces"): {"list", "watch"},
}
CLUSTER_WIDE_PERMISSIONS = {**OPERATOR_PERMISSIONS, **POLICY_READ_PERMISSIONS}
# What it may do in the release namespace for leader election, when on.
LEASE_PERMISSIONS = {("coordination.k8s.io", "leases"): {"get", "create", "update"}}

CLUSTER_SCOPED_KINDS = {"ClusterRole", "ClusterRoleBinding"}

# Kinds rendered with default values (ClusterRole: the operator's own, the
# policy reader, and the two aggregated view/edit roles).
DEFAULT_KINDS = Counter(
    {
        "ServiceAccount": 1,
        "ClusterRole": 4,
        "ClusterRoleBinding": 2,
        "Deployment": 1,
        "Service": 1,
    }
)


def kinds(**extra: int) -> Counter:
    """DEFAULT_KINDS adjusted by ``extra`` (a count of 0 removes the kind)."""
    counter = Counter(DEFAULT_KINDS)
    for kind, count in extra.items():
        counter[kind] = count
    return +counter


# name -> (values, expected kinds)
VALUE_SETS: dict[str, tuple[dict[str, Any], Counter]] = {
    "defaults": ({}, kinds()),
    "watch-namespaces": (
        {"watchNamespaces": ["a", "b"]},
        kinds(ClusterRole=3, ClusterRoleBinding=1, Role=2, RoleBinding=2),
    ),
    "service-monitor": ({"serviceMonitor": {"enabled": True}}, kinds(ServiceMonitor=1)),
    "prometheus-rule": (
        {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
        kinds(ServiceMonitor=1, PrometheusRule=1),
    ),
    "replicas-2": ({"replicas": 2}, kinds(Role=1, RoleBinding=1)),
    "network-policy": (
        {
            "networkPolicy": {
                "enabled": True,
                "metricsIngressFrom": [
                    {
                        "namespaceSelector": {
                            "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
                        }
                    }
                ],
            }
        },
        kinds(NetworkPolicy=1),
    ),
    "pdb": (
        {"replicas": 2, "podDisruptionBudget": {"enabled": True}},
        kinds(Role=1, RoleBinding=1, PodDisruptionBudget=1),
    ),
    "irsa": (
        {
            "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": IRSA_ROLE}},
            "aws": {"region": "eu-west-1"},
        },
        kinds(),
    ),
    "namespaced-no-aggregated-roles": (
        {"watchNamespaces": ["a"], "rbac": {"aggregateClusterRoles": False}},
        kinds(ClusterRole=1, ClusterRoleBinding=1, Role=1, RoleBinding=1),
    ),
    "existing-service-account": (
        {"serviceAccount": {"create": False, "name": "preexisting"}},
        kinds(ServiceAccount=0),
    ),
    "everything": (
        {
            "replicas": 3,
            "watchNamespaces": ["team-a", "team-b", "team-c"],
            "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
            "podDisruptionBudget": {"enabled": True},
            "networkPolicy": {"enabled": True},
            "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": IRSA_ROLE}},
            "topologySpreadConstraints": [
                {
                    "maxSkew": 1,
                    "topologyKey": "topology.kubernetes.io/zone",
                    "whenUnsatisfiable": "ScheduleAnyway",
                }
            ],
        },
        kinds(
            ClusterRole=3,
            ClusterRoleBinding=1,
            Role=4,
            RoleBinding=4,
            ServiceMonitor=1,
            PodDisruptionBudget=1,
            NetworkPolicy=1,
        ),
    ),
}


# --------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


def render_raw(chart, values: dict[str, Any] | None = None, *, name: str = RELEASE,
               namespace: str = NAMESPACE) -> dict[str, str]:
    return chart.render(values or {}, name=name, namespace=namespace)


def render(chart, values: dict[str, Any] | None = None, *, name: str = RELEASE,
           namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    """Render and parse every manifest (NOTES.txt excluded) into documents."""
    docs: list[dict[str, Any]] = []
    for path, text in render_raw(chart, values, name=name, namespace=namespace).items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc is None:
                continue
            assert isinstance(doc, dict), f"{path}: document is not a mapping"
            docs.append(doc)
    return docs


def notes(chart, values: dict[str, Any] | None = None) -> str:
    rendered = render_raw(chart, values)
    return rendered["embed-url-operator/templates/NOTES.txt"]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = of_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def args(docs: list[dict[str, Any]]) -> list[str]:
    return container(docs)["args"]


def env(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container(docs)["env"]}


def sa_name(docs: list[dict[str, Any]]) -> str:
    return one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"]


def permissions(rules: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) -> verbs, merged over all rules."""
    merged: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                merged.setdefault((group, resource), set()).update(rule["verbs"])
    return merged


def granted(docs: list[dict[str, Any]]) -> dict[str | None, dict[tuple[str, str], set[str]]]:
    """Permissions bound to the operator's ServiceAccount, per namespace.

    Key None: cluster-wide (ClusterRoleBinding); otherwise the namespace of
    the RoleBinding. Fails when a binding points at a role not rendered.
    """
    account = sa_name(docs)
    roles = {("ClusterRole", None, d["metadata"]["name"]): d for d in of_kind(docs, "ClusterRole")}
    roles.update(
        {("Role", d["metadata"]["namespace"], d["metadata"]["name"]): d for d in of_kind(docs, "Role")}
    )
    result: dict[str | None, dict[tuple[str, str], set[str]]] = {}
    for binding in of_kind(docs, "ClusterRoleBinding") + of_kind(docs, "RoleBinding"):
        subjects = binding.get("subjects") or []
        if not any(
            s["kind"] == "ServiceAccount" and s["name"] == account and s["namespace"] == NAMESPACE
            for s in subjects
        ):
            continue
        scope = binding["metadata"].get("namespace") if binding["kind"] == "RoleBinding" else None
        ref = binding["roleRef"]
        assert ref["apiGroup"] == "rbac.authorization.k8s.io"
        role_ns = None if ref["kind"] == "ClusterRole" else scope
        role = roles.get((ref["kind"], role_ns, ref["name"]))
        assert role is not None, f"{binding['kind']} {binding['metadata']['name']} refers to a missing {ref}"
        for key, verbs in permissions(role["rules"]).items():
            result.setdefault(scope, {}).setdefault(key, set()).update(verbs)
    return result


def all_rules(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [rule for d in docs if d["kind"] in ("Role", "ClusterRole") for rule in d.get("rules", [])]


# --------------------------------------------------------------------------
# lint and structure


def test_chart_metadata(chart):
    meta = chart.metadata
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == "embed-url-operator"
    assert meta["version"] == "0.1.0"
    cargo = tomllib.loads((REPO_ROOT / "Cargo.toml").read_text())
    assert meta["appVersion"] == cargo["package"]["version"], "appVersion must be the crate version"


@pytest.mark.parametrize("case", sorted(VALUE_SETS))
def test_lint_passes(case):
    values, _ = VALUE_SETS[case]
    report = helm.lint(CHART_DIR, values, strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == []


@pytest.mark.parametrize("case", sorted(VALUE_SETS))
def test_render_kinds(chart, case):
    values, expected = VALUE_SETS[case]
    docs = render(chart, values)
    assert Counter(d["kind"] for d in docs) == expected
    for doc in docs:
        assert doc.get("apiVersion"), doc
        meta = doc["metadata"]
        assert meta["labels"]["app.kubernetes.io/instance"] == RELEASE
        if doc["kind"] not in CLUSTER_SCOPED_KINDS:
            assert meta.get("namespace"), f"{doc['kind']} {meta['name']} has no namespace"


def test_standard_labels(chart):
    for doc in render(chart):
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "embed-url-operator"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/version"] == "0.1.0"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"] == "embed-url-operator-0.1.0"


@pytest.mark.parametrize("case", sorted(VALUE_SETS))
def test_names_fit_in_63_chars(chart, case):
    values, _ = VALUE_SETS[case]
    # 53 characters: the longest release name Helm accepts.
    long_release = "a-very-long-release-name-for-testing-truncation-12345"
    assert len(long_release) == 53
    helm.validate_release_name(long_release)
    docs = render(chart, values, name=long_release)
    names = [d["metadata"]["name"] for d in docs]
    label_values = [v for d in docs for v in d["metadata"]["labels"].values()]
    for name in names:
        assert len(name) <= 63, name
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), name
    for value in label_values:
        assert len(value) <= 63, value
    # Truncation must not make two objects of the same kind collide.
    keys = [(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys))


def test_fullname_override_and_release_containing_chart_name(chart):
    docs = render(chart, {"fullnameOverride": "embedurl"})
    assert one(docs, "Deployment")["metadata"]["name"] == "embedurl"
    docs = render(chart, name="embed-url-operator")
    assert one(docs, "Deployment")["metadata"]["name"] == "embed-url-operator"


# --------------------------------------------------------------------------
# RBAC


@pytest.mark.parametrize("case", sorted(VALUE_SETS))
def test_rbac_has_no_wildcards(chart, case):
    values, _ = VALUE_SETS[case]
    rules = all_rules(render(chart, values))
    assert rules
    for rule in rules:
        for field in ("verbs", "resources", "apiGroups", "resourceNames", "nonResourceURLs"):
            for item in rule.get(field, []):
                assert "*" not in item, f"wildcard in {field}: {rule}"


def test_rbac_default_is_cluster_wide_least_privilege(chart):
    docs = render(chart)
    assert granted(docs) == {None: CLUSTER_WIDE_PERMISSIONS}
    # Exact verb lists, no duplicates.
    for rule in all_rules(docs):
        assert len(rule["verbs"]) == len(set(rule["verbs"])), rule


def test_rbac_secrets_verbs_exact(chart):
    for values, scopes in (
        ({}, {None}),
        ({"watchNamespaces": ["a"]}, {"a"}),
        ({"replicas": 2}, {None}),
    ):
        granting = {
            scope: perms[("", "secrets")]
            for scope, perms in granted(render(chart, values)).items()
            if ("", "secrets") in perms
        }
        # Secrets are granted exactly where the operator works, with exactly these verbs
        # (no delete or update: the garbage collector deletes, server-side apply writes).
        assert set(granting) == scopes, (values, granting)
        for verbs in granting.values():
            assert verbs == {"get", "list", "watch", "create", "patch"}, (values, verbs)


def test_rbac_watch_namespaces_uses_roles(chart):
    docs = render(chart, {"watchNamespaces": ["a", "b"]})
    assert granted(docs) == {
        None: POLICY_READ_PERMISSIONS,
        "a": OPERATOR_PERMISSIONS,
        "b": OPERATOR_PERMISSIONS,
    }
    assert {r["metadata"]["namespace"] for r in of_kind(docs, "Role")} == {"a", "b"}
    assert {r["metadata"]["namespace"] for r in of_kind(docs, "RoleBinding")} == {"a", "b"}
    # The only cluster-wide grant left is reading policies and namespaces.
    assert len(of_kind(docs, "ClusterRoleBinding")) == 1
    # The other ClusterRoles are the user-facing aggregated ones: they are
    # bound to nobody by the chart and grant nothing the operator needs.
    for role in of_kind(docs, "ClusterRole"):
        if set(permissions(role["rules"])) == set(POLICY_READ_PERMISSIONS):
            continue
        labels = role["metadata"]["labels"]
        assert any(k.startswith("rbac.authorization.k8s.io/aggregate-to-") for k in labels)
        assert set(permissions(role["rules"])) == {("embedurl.io", "embedurlrequests")}
    assert "--namespace=a" in args(docs)
    assert "--namespace=b" in args(docs)
    assert not [a for a in args(render(chart)) if a.startswith("--namespace")]


def test_rbac_aggregated_roles_grant_no_secrets(chart):
    docs = render(chart)
    aggregated = [
        r for r in of_kind(docs, "ClusterRole")
        if any(k.startswith("rbac.authorization.k8s.io/aggregate-to-") for k in r["metadata"]["labels"])
    ]
    assert len(aggregated) == 2
    for role in aggregated:
        assert set(permissions(role["rules"])) == {("embedurl.io", "embedurlrequests")}
    docs = render(chart, {"rbac": {"aggregateClusterRoles": False}})
    assert len(of_kind(docs, "ClusterRole")) == 2


def test_rbac_disabled_renders_no_rbac(chart):
    docs = render(chart, {"rbac": {"create": False}, "replicas": 2})
    assert not [d for d in docs if d["kind"] in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")]


@pytest.mark.parametrize(
    ("values", "on"),
    [
        ({}, False),
        ({"replicas": 1}, False),
        ({"replicas": 2}, True),
        ({"replicas": 1, "leaderElection": {"enabled": True}}, True),
        ({"replicas": 3, "leaderElection": {"enabled": "auto"}}, True),
        ({"replicas": 2, "leaderElection": {"enabled": False}}, False),
        ({"replicas": 2, "watchNamespaces": ["a"]}, True),
    ],
)
def test_leader_election(chart, values, on):
    docs = render(chart, values)
    argv = args(docs)
    lease_perms = {
        scope: {k: v for k, v in perms.items() if k[0] == "coordination.k8s.io"}
        for scope, perms in granted(docs).items()
    }
    lease_perms = {scope: perms for scope, perms in lease_perms.items() if perms}
    lease_rules = [r for r in all_rules(docs) if "leases" in r["resources"]]
    strategy = one(docs, "Deployment")["spec"].get("strategy")
    if on:
        # The new pod stands by until the old one hands the Lease over.
        # Written out (Kubernetes' defaults), so that a later switch to Recreate removes it.
        assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}}
        assert "--leader-election" in argv
        assert f"--lease-name={FULLNAME}" in argv
        assert "--lease-duration=15s" in argv
        # Only in the release namespace, as a Role.
        assert lease_perms == {NAMESPACE: LEASE_PERMISSIONS}
        # get/update limited to the operator's own Lease.
        for rule in lease_rules:
            if set(rule["verbs"]) & {"get", "update"}:
                assert rule["resourceNames"] == [FULLNAME]
    else:
        # A rolling update would run two active pods, both minting every URL. The null clears
        # the rollingUpdate the API server defaulted while an earlier release had leader
        # election on; Recreate with it still set is refused, failing the upgrade.
        assert strategy == {"type": "Recreate", "rollingUpdate": None}
        assert not [a for a in argv if a.startswith("--lease") or a == "--leader-election"]
        assert lease_perms == {}
        assert lease_rules == []


def test_an_explicit_strategy_is_kept(chart):
    rolling = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    for values in [{}, {"replicas": 2}]:
        docs = render(chart, {**values, "strategy": rolling})
        assert one(docs, "Deployment")["spec"]["strategy"] == rolling


def test_leader_election_lease_values(chart):
    docs = render(chart, {"replicas": 2, "leaderElection": {"leaseName": "my-lease", "leaseDuration": "30s"}})
    assert "--lease-name=my-lease" in args(docs)
    assert "--lease-duration=30s" in args(docs)
    rules = [r for r in all_rules(docs) if "resourceNames" in r]
    assert [r["resourceNames"] for r in rules] == [["my-lease"]]


# --------------------------------------------------------------------------
# Deployment


def test_pod_security(chart):
    docs = render(chart)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["runAsUser"] == 65532
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    csc = container(docs)["securityContext"]
    assert csc["runAsNonRoot"] is True
    assert csc["runAsUser"] == 65532
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"] == {"drop": ["ALL"]}
    assert csc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is True
    assert "volumes" not in pod
    assert "hostNetwork" not in pod


def test_probes_and_ports(chart):
    docs = render(chart)
    c = container(docs)
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}


def test_resources_defaults(chart):
    resources = container(render(chart))["resources"]
    assert resources["requests"] == {"cpu": "50m", "memory": "64Mi"}
    assert resources["limits"] == {"memory": "256Mi"}


def test_image_defaults_to_app_version(chart):
    c = container(render(chart))
    assert c["image"] == "embed-url-operator:0.1.0"
    assert c["imagePullPolicy"] == "IfNotPresent"
    c = container(render(chart, {"image": {"repository": "reg.example/op", "tag": "1.2.3", "pullPolicy": "Always"}}))
    assert c["image"] == "reg.example/op:1.2.3"
    assert c["imagePullPolicy"] == "Always"
    digest = "sha256:" + "ab" * 32
    c = container(render(chart, {"image": {"digest": digest}}))
    assert c["image"] == f"embed-url-operator@{digest}"


def test_default_args_and_env(chart):
    docs = render(chart)
    assert args(docs) == [
        "--concurrency=16",
        "--log-format=text",
        "--policy-mode=enforce",
        "--aws-qps=10",
        "--aws-burst=20",
        "--stall-timeout=15m",
    ]
    variables = env(docs)
    assert variables["RUST_LOG"]["value"] == "info"
    assert variables["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert variables["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert "AWS_REGION" not in variables
    # IRSA's session name, stable: the QuickSight identity of requests without userArn.
    assert variables["AWS_ROLE_SESSION_NAME"]["value"] == FULLNAME
    assert one(docs, "Deployment")["spec"]["replicas"] == 1


def test_values_reach_the_container(chart):
    docs = render(
        chart,
        {
            "aws": {"region": "eu-west-1"},
            "logLevel": "info,embed_url_operator=debug",
            "logFormat": "json",
            "concurrency": 4,
            "livenessProbe": {"stallTimeout": "30m"},
            "extraEnv": [{"name": "AWS_STS_REGIONAL_ENDPOINTS", "value": "regional"}],
            "extraArgs": ["--http-addr=[::]:8080"],
        },
    )
    variables = env(docs)
    assert variables["AWS_REGION"]["value"] == "eu-west-1"
    assert variables["RUST_LOG"]["value"] == "info,embed_url_operator=debug"
    assert variables["AWS_STS_REGIONAL_ENDPOINTS"]["value"] == "regional"
    argv = args(docs)
    assert "--log-format=json" in argv
    assert "--concurrency=4" in argv
    assert "--stall-timeout=30m" in argv
    assert argv[-1] == "--http-addr=[::]:8080"


def test_pod_scheduling_values(chart):
    toleration = {"key": "CriticalAddonsOnly", "operator": "Exists"}
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "role", "operator": "In", "values": ["system"]}]}]}}}
    docs = render(
        chart,
        {
            "nodeSelector": {"role": "system"},
            "tolerations": [toleration],
            "affinity": affinity,
            "priorityClassName": "system-cluster-critical",
            "terminationGracePeriodSeconds": 45,
            "podAnnotations": {"a": "1"},
            "podLabels": {"team": "data"},
            "imagePullSecrets": [{"name": "regcred"}],
            "topologySpreadConstraints": [
                {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule"},
                {"maxSkew": 2, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway",
                 "labelSelector": {"matchLabels": {"custom": "yes"}}},
            ],
        },
    )
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    # Helm merges maps with the defaults.
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux", "role": "system"}
    assert pod["tolerations"] == [toleration]
    assert pod["affinity"] == affinity
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["terminationGracePeriodSeconds"] == 45
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    meta = deployment["spec"]["template"]["metadata"]
    assert meta["annotations"] == {"a": "1"}
    assert meta["labels"]["team"] == "data"
    spread = pod["topologySpreadConstraints"]
    # A constraint without a labelSelector gets the pod's selector labels.
    assert spread[0]["labelSelector"] == {"matchLabels": deployment["spec"]["selector"]["matchLabels"]}
    assert spread[1]["labelSelector"] == {"matchLabels": {"custom": "yes"}}


def test_selectors_match_pods(chart):
    docs = render(chart, VALUE_SETS["everything"][0])
    deployment = one(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert one(docs, "Service")["spec"]["selector"].items() <= pod_labels.items()
    assert one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert one(docs, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()


# --------------------------------------------------------------------------
# ServiceAccount, Service, ServiceMonitor, PDB, NetworkPolicy


def test_service_account_irsa(chart):
    docs = render(chart, VALUE_SETS["irsa"][0])
    account = one(docs, "ServiceAccount")
    assert account["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": IRSA_ROLE}
    assert account["automountServiceAccountToken"] is True
    assert account["metadata"]["name"] == sa_name(docs) == FULLNAME
    assert account["metadata"]["namespace"] == NAMESPACE
    assert IRSA_ROLE in notes(chart, VALUE_SETS["irsa"][0])


def test_existing_service_account(chart):
    docs = render(chart, {"serviceAccount": {"create": False, "name": "preexisting"}})
    assert of_kind(docs, "ServiceAccount") == []
    assert sa_name(docs) == "preexisting"
    assert granted(docs) == {None: CLUSTER_WIDE_PERMISSIONS}
    docs = render(chart, {"serviceAccount": {"name": "custom"}})
    assert one(docs, "ServiceAccount")["metadata"]["name"] == "custom" == sa_name(docs)
    # Not the namespace's `default` ServiceAccount by omission: the RBAC reads Secrets, and
    # every other pod in the namespace runs as `default`.
    with pytest.raises(helm.HelmRenderError, match="serviceAccount.name"):
        render(chart, {"serviceAccount": {"create": False}})
    # Without the chart's RBAC nothing is granted to it: `default` as before.
    assert sa_name(render(chart, {"serviceAccount": {"create": False}, "rbac": {"create": False}})) == "default"
    assert sa_name(render(chart, {"serviceAccount": {"create": False, "name": "default"}})) == "default"


def alerts(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The PrometheusRule's alerting rules by name."""
    groups = one(docs, "PrometheusRule")["spec"]["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


def test_prometheus_rule(chart):
    assert of_kind(render(chart), "PrometheusRule") == []
    docs = render(
        chart,
        {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True, "labels": {"release": "prom"}}},
    )
    rule = one(docs, "PrometheusRule")
    assert rule["metadata"]["namespace"] == NAMESPACE
    assert rule["metadata"]["labels"]["release"] == "prom"
    rules = alerts(docs)
    assert set(rules) == {
        "EmbedUrlAboutToLapse",
        "EmbedUrlRequestNotReady",
        "EmbedUrlOperatorFallingBehind",
        "EmbedUrlAwsRateLimitTooLow",
        "EmbedUrlOperatorDown",
    }
    # Every expression parses as PromQL and names only metrics the README documents (the
    # operator's metrics table), so a renamed metric cannot leave an alert that never fires.
    documented = set(re.findall(r"^\| `(embedurl_[a-z_]+)`", (REPO_ROOT / "README.md").read_text(), re.M))
    assert "embedurl_ready" in documented
    for name, alert in rules.items():
        promql_parser.parse(alert["expr"])
        for metric in re.findall(r"embedurl_[a-z_]+", alert["expr"]):
            assert metric in documented, (name, metric)
        assert alert["labels"]["severity"] in {"critical", "warning"}
    # The per-request alerts are the README's, word for word.
    readme = (REPO_ROOT / "README.md").read_text()
    for name in ["EmbedUrlAboutToLapse", "EmbedUrlRequestNotReady"]:
        assert f"`{rules[name]['expr']}`" in readme, name
    # A suspended request is not ready on purpose; a change of reason is still the same alert.
    not_ready = rules["EmbedUrlRequestNotReady"]["expr"]
    assert 'embedurl_ready{reason!="Suspended"}' in not_ready
    assert not_ready.startswith("max without (reason) (")
    # Prometheus, not Helm, fills in the alert's labels.
    assert "{{ $labels.namespace }}/{{ $labels.name }}" in rules["EmbedUrlAboutToLapse"]["annotations"]["description"]
    # The lapse alert fires at once: with a `for`, it would come only after the URL lapsed.
    assert "for" not in rules["EmbedUrlAboutToLapse"]
    # The operator-wide alerts look at this release's target: the job the chart's
    # ServiceMonitor produces (its jobLabel names the Service label whose value becomes `job`)
    # in the release namespace; another release's operator does not count.
    job_label = one(docs, "ServiceMonitor")["spec"]["jobLabel"]
    job = one(docs, "Service")["metadata"]["labels"][job_label]
    target = f'job="{job}", namespace="{NAMESPACE}"'
    assert rules["EmbedUrlOperatorDown"]["expr"] == f"absent(up{{{target}}} == 1)"
    assert rules["EmbedUrlOperatorDown"]["labels"]["namespace"] == NAMESPACE
    assert f"embedurl_reconciles_due{{{target}}}" in rules["EmbedUrlOperatorFallingBehind"]["expr"]
    assert rules["EmbedUrlAwsRateLimitTooLow"]["expr"].count(target) == 2
    # No runbook unless its URL is given; then each alert links to its section of docs/runbook.md.
    assert not any("runbook_url" in alert["annotations"] for alert in rules.values())
    base = "https://git.example.com/platform/embed-url-operator/blob/main/docs/runbook.md"
    linked = alerts(render(chart, {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True, "runbookUrl": base}}))
    runbook = (REPO_ROOT / "docs" / "runbook.md").read_text()
    sections = {heading.lower() for heading in re.findall(r"^## (\w+)$", runbook, re.M)}
    assert sections == {name.lower() for name in linked}
    for name, alert in linked.items():
        assert alert["annotations"]["runbook_url"] == f"{base}#{name.lower()}"
    for bad in ["git.example.com/runbook.md", f"{base}#section", 'https://a"b']:
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema({"prometheusRule": {"runbookUrl": bad}})
    # A scrape job of the user's own is matched by its name alone.
    docs = render(chart, {"prometheusRule": {"enabled": True, "job": "kubernetes-pods", "fallingBehindFor": "30m"}})
    rules = alerts(docs)
    assert rules["EmbedUrlOperatorDown"]["expr"] == 'absent(up{job="kubernetes-pods"} == 1)'
    assert rules["EmbedUrlOperatorFallingBehind"]["for"] == "30m"
    # A job name YAML would read as a comment stays part of the expression.
    docs = render(chart, {"prometheusRule": {"enabled": True, "job": "pods #1"}})
    rules = alerts(docs)
    assert rules["EmbedUrlOperatorFallingBehind"]["expr"] == 'embedurl_reconciles_due{job="pods #1"} > 0'
    # Without anything scraping the operator the down alert would fire for ever.
    with pytest.raises(helm.HelmRenderError, match="serviceMonitor.enabled"):
        render(chart, {"prometheusRule": {"enabled": True}})
    for bad in ["ten minutes", "5m10m", "1.5h"]:
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema({"prometheusRule": {"fallingBehindFor": bad}})
    chart.validate_schema({"prometheusRule": {"fallingBehindFor": "1h30m"}})
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema({"prometheusRule": {"job": 'a"b'}})


def test_metrics_service(chart):
    service = one(render(chart), "Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [
        {"name": "http-metrics", "port": 8080, "targetPort": "http", "protocol": "TCP"}
    ]


def test_service_monitor(chart):
    assert of_kind(render(chart), "ServiceMonitor") == []
    docs = render(chart, {"serviceMonitor": {"enabled": True, "interval": "30s", "labels": {"release": "prom"}}})
    monitor = one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "http-metrics"
    assert endpoint["path"] == "/metrics"
    assert endpoint["interval"] == "30s"
    # No timeout unless one is given: a fixed one longer than a short interval is refused.
    assert "scrapeTimeout" not in endpoint
    docs = render(chart, {"serviceMonitor": {"enabled": True, "interval": "15s", "scrapeTimeout": "10s"}})
    [endpoint] = one(docs, "ServiceMonitor")["spec"]["endpoints"]
    assert (endpoint["interval"], endpoint["scrapeTimeout"]) == ("15s", "10s")
    docs = render(chart, {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}})
    monitor = one(docs, "ServiceMonitor")
    [endpoint] = monitor["spec"]["endpoints"]
    # The per-request series' `namespace` and `service` are the operator's, not the target's.
    assert endpoint["honorLabels"] is True
    service = one(docs, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()


def test_pod_disruption_budget(chart):
    assert of_kind(render(chart), "PodDisruptionBudget") == []
    pdb = one(render(chart, {"replicas": 2, "podDisruptionBudget": {"enabled": True}}), "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["minAvailable"] == 1
    assert "maxUnavailable" not in pdb["spec"]
    pdb = one(render(chart, {"podDisruptionBudget": {"enabled": True, "maxUnavailable": "50%"}}), "PodDisruptionBudget")
    assert pdb["spec"] == {"selector": pdb["spec"]["selector"], "maxUnavailable": "50%"}
    assert "WARNING" in notes(chart, {"podDisruptionBudget": {"enabled": True}})


def test_network_policy(chart):
    assert of_kind(render(chart), "NetworkPolicy") == []
    values = VALUE_SETS["network-policy"][0]
    policy = one(render(chart, values), "NetworkPolicy")["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    [ingress] = policy["ingress"]
    assert ingress["from"] == values["networkPolicy"]["metricsIngressFrom"]
    assert ingress["ports"] == [{"port": "http", "protocol": "TCP"}]
    egress_ports = {
        (p["port"], p["protocol"]) for rule in policy["egress"] if "to" not in rule for p in rule["ports"]
    }
    assert {(53, "UDP"), (53, "TCP"), (443, "TCP")} <= egress_ports
    pod_identity = [r for r in policy["egress"] if "to" in r]
    assert pod_identity[0]["to"][0] == {"ipBlock": {"cidr": "169.254.170.23/32"}}
    # Instance metadata (the node role's credentials) only when asked for.
    assert not any(
        "169.254.169.254/32" in str(rule) for rule in policy["egress"]
    )
    metadata_values = {"networkPolicy": {**values["networkPolicy"], "allowInstanceMetadata": True}}
    policy_with_metadata = one(render(chart, metadata_values), "NetworkPolicy")["spec"]
    [metadata] = [r for r in policy_with_metadata["egress"] if {"ipBlock": {"cidr": "169.254.169.254/32"}} in r.get("to", [])]
    assert metadata["to"][1] == {"ipBlock": {"cidr": "fd00:ec2::254/128"}}
    assert metadata["ports"] == [{"port": 80, "protocol": "TCP"}]

    extra = {"ports": [{"port": 6443, "protocol": "TCP"}]}
    policy = one(
        render(chart, {"networkPolicy": {"enabled": True, "allowPodIdentityAgent": False, "extraEgress": [extra]}}),
        "NetworkPolicy",
    )["spec"]
    assert policy["ingress"] == []  # no peers configured: nothing may connect
    assert extra in policy["egress"]
    assert not [r for r in policy["egress"] if "to" in r]


# --------------------------------------------------------------------------
# NOTES.txt


def test_notes(chart):
    text = notes(chart)
    assert "kubectl get pods" in text
    assert "kubectl logs" in text
    assert "kubectl get crd embedurlrequests.embedurl.io embedurlpolicies.embedurl.io" in text
    assert "kubectl apply -f - <<EOF" in text
    assert not re.search(r"kubectl apply -f\s+https?://", text)
    # The inline examples are a valid EmbedUrlPolicy, then an EmbedUrlRequest it allows.
    examples = [
        yaml.safe_load(part.split("EOF", 1)[0].replace("\n     ", "\n"))
        for part in text.split("kubectl apply -f - <<EOF")[1:]
    ]
    policy, request = examples
    assert policy["kind"] == "EmbedUrlPolicy"
    assert request["metadata"]["namespace"] in policy["spec"]["namespaces"]
    assert request["apiVersion"] == "embedurl.io/v1alpha1"
    assert request["kind"] == "EmbedUrlRequest"
    assert set(request["spec"]["quickSight"]) >= {"awsAccountId"}
    assert "WARNING" not in text


def test_notes_warn_about_replicas_without_leader_election(chart):
    assert "WARNING" in notes(chart, {"replicas": 2, "leaderElection": {"enabled": False}})


def test_notes_warn_when_the_network_policy_blocks_scraping(chart):
    closed = {"serviceMonitor": {"enabled": True}, "networkPolicy": {"enabled": True}}
    assert "Prometheus\ncannot scrape" in notes(chart, closed)
    prometheus = [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]
    open_to_it = {
        "serviceMonitor": {"enabled": True},
        "networkPolicy": {"enabled": True, "metricsIngressFrom": prometheus},
    }
    assert "cannot scrape" not in notes(chart, open_to_it)


# --------------------------------------------------------------------------
# values.yaml and values.schema.json


def test_schema_accepts_defaults_and_value_sets(chart):
    chart.validate_schema({})
    for values, _ in VALUE_SETS.values():
        chart.validate_schema(values)


@pytest.mark.parametrize(
    "values",
    [
        pytest.param({"replicaCount": 2}, id="unknown-top-level-key"),
        pytest.param({"replicas": "2"}, id="replicas-string"),
        pytest.param({"replicas": -1}, id="replicas-negative"),
        pytest.param({"watchNamespaces": "a,b"}, id="watchNamespaces-string"),
        pytest.param({"watchNamespaces": [1, 2]}, id="watchNamespaces-ints"),
        pytest.param({"watchNamespaces": ["Not_A_Namespace"]}, id="watchNamespaces-invalid-name"),
        pytest.param({"logFormat": "xml"}, id="logFormat-enum"),
        pytest.param({"leaderElection": {"enabled": "yes"}}, id="leaderElection-enum"),
        pytest.param({"leaderElection": {"leaseDuration": 15}}, id="leaseDuration-int"),
        pytest.param({"leaderElection": {"leaseDuration": "500ms"}}, id="leaseDuration-under-a-second"),
        pytest.param({"leaderElection": {"leaseDuration": "0s"}}, id="leaseDuration-zero"),
        pytest.param({"leaderElection": {"leaseDuration": ""}}, id="leaseDuration-empty"),
        pytest.param({"livenessProbe": {"stallTimeout": 900}}, id="stallTimeout-int"),
        pytest.param({"livenessProbe": {"stallTimeout": "15 minutes"}}, id="stallTimeout-words"),
        pytest.param({"livenessProbe": {"stallTimeout": ""}}, id="stallTimeout-empty"),
        pytest.param({"serviceMonitor": {"interval": "1.5m"}}, id="serviceMonitor-interval-fraction"),
        pytest.param({"serviceMonitor": {"scrapeTimeout": "10sec"}}, id="serviceMonitor-scrapeTimeout-unit"),
        pytest.param({"image": {"pullPolicy": "Sometimes"}}, id="pullPolicy-enum"),
        pytest.param({"image": {"tagg": "1"}}, id="unknown-image-key"),
        pytest.param({"serviceAccount": {"annotations": {"a": 1}}}, id="annotation-not-string"),
        pytest.param({"serviceMonitor": {"enabled": "yes"}}, id="serviceMonitor-enabled-string"),
        pytest.param({"podDisruptionBudget": {"minAvailable": "half"}}, id="pdb-minAvailable"),
        pytest.param({"concurrency": 0}, id="concurrency-zero"),
        pytest.param({"concurrency": 70000}, id="concurrency-above-u16"),
        pytest.param({"awsRateLimit": {"qps": 0.0001}}, id="qps-below-the-flags-range"),
        pytest.param({"awsRateLimit": {"qps": 2000000}}, id="qps-above-the-flags-range"),
        pytest.param({"awsRateLimit": {"qps": -1}}, id="qps-negative"),
        pytest.param({"extraArgs": "--foo"}, id="extraArgs-string"),
        pytest.param({"aws": {"region": "Europe"}}, id="aws-region"),
    ],
)
def test_schema_rejects_bad_values(chart, values):
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)
    # Helm itself refuses to render (and so to install) with them.
    with pytest.raises(helm.HelmValuesError):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


@pytest.mark.parametrize(
    "values",
    [
        pytest.param({"leaderElection": {"leaseDuration": "15s"}}, id="leaseDuration-15s"),
        pytest.param({"leaderElection": {"leaseDuration": "1m30s"}}, id="leaseDuration-1m30s"),
        pytest.param({"leaderElection": {"leaseDuration": "1s"}}, id="leaseDuration-1s"),
        pytest.param({"livenessProbe": {"stallTimeout": "0s"}}, id="stallTimeout-off"),
        pytest.param({"aws": {"region": "eusc-de-east-1"}}, id="aws-region-sovereign-cloud"),
        pytest.param({"livenessProbe": {"stallTimeout": "1h30m"}}, id="stallTimeout-1h30m"),
        pytest.param({"serviceMonitor": {"interval": "1m30s", "scrapeTimeout": "500ms"}}, id="serviceMonitor-durations"),
        pytest.param({"awsRateLimit": {"qps": 0}}, id="qps-off"),
        pytest.param({"awsRateLimit": {"qps": 0.5}}, id="qps-fraction"),
        pytest.param({"concurrency": 65535}, id="concurrency-max"),
    ],
)
def test_schema_accepts_good_values(chart, values):
    chart.validate_schema(values)


def test_schema_top_level_is_closed(chart):
    schema = chart.schema
    assert schema is not None
    assert schema["additionalProperties"] is False
    assert set(chart.values) <= set(schema["properties"])


def test_every_value_is_commented():
    """Each top-level key has a comment above it, or is a group whose
    every key has one."""
    lines = (CHART_DIR / "values.yaml").read_text().splitlines()
    key = re.compile(r"^( *)([A-Za-z][A-Za-z0-9]*):")

    def commented(index: int) -> bool:
        j = index - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        return j >= 0 and lines[j].lstrip().startswith("#")

    missing: list[str] = []
    i = 0
    while i < len(lines):
        match = key.match(lines[i])
        if match and match.group(1) == "":
            name = match.group(2)
            children = []
            j = i + 1
            # The block ends at the next line that starts in column 0.
            while j < len(lines) and (not lines[j].strip() or lines[j].startswith(" ")):
                child = key.match(lines[j])
                if child and child.group(1) == "  ":
                    children.append(j)
                j += 1
            if not commented(i):
                if not children:
                    missing.append(name)
                missing.extend(f"{name}.{key.match(lines[c]).group(2)}" for c in children if not commented(c))
            i = j
        else:
            i += 1
    assert missing == []


# --------------------------------------------------------------------------
# CRDs


def test_chart_crds_identical_to_top_level_crds(chart):
    """charts/embed-url-operator/crds/ must hold exactly the files of the
    top-level crds/ (generated by `embed-url-operator crd`), byte for byte."""

    def yaml_files(directory: Path) -> dict[str, bytes]:
        assert directory.is_dir(), f"{directory} is missing"
        files = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")}
        assert files, f"{directory} holds no CRD file"
        for name, data in files.items():
            assert data.strip(), f"{directory / name} is empty"
        return files

    top = yaml_files(TOP_LEVEL_CRDS)
    ours = yaml_files(CHART_CRDS)
    assert sorted(ours) == sorted(top), "file names differ"
    for name in top:
        assert ours[name] == top[name], f"crds/{name} differs from charts/embed-url-operator/crds/{name}"

    # Helm sees it as the EmbedUrlRequest CRD.
    crds = [doc for item in chart.crds for doc in yaml.safe_load_all(item["data"]) if doc]
    names = {doc["metadata"]["name"] for doc in crds if doc.get("kind") == "CustomResourceDefinition"}
    assert "embedurlrequests.embedurl.io" in names


def test_policy_mode(chart):
    assert "--policy-mode=enforce" in args(render(chart))
    assert "--policy-mode=permissive" in args(render(chart, {"policyMode": "permissive"}))
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema({"policyMode": "off"})


def test_aws_rate_limit(chart):
    docs = render(chart, {"awsRateLimit": {"qps": 2.5, "burst": 5}})
    assert "--aws-qps=2.5" in args(docs)
    assert "--aws-burst=5" in args(docs)
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema({"awsRateLimit": {"qps": -1}})
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema({"awsRateLimit": {"burst": "lots"}})
