"""The objects the chart creates: names, kinds, namespace, scheduling, ports, storage, probes,
security, labels and update behaviour, for the defaults and several value sets."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

import helm_python
import kubernetes_validate
import pytest

from tests.chart.conftest import CHART, KUBE_VERSION, REQUIRED, VALUE_SETS, Render, merged

SEED_OBJECTS = {
    ("DaemonSet", "p2p-agent"),
    ("Deployment", "p2p-proxy"),
    ("Deployment", "p2p-tracker"),
    ("Service", "p2p-proxy"),
    ("Service", "p2p-tracker"),
    ("ConfigMap", "agent"),
    ("ConfigMap", "proxy"),
    ("ConfigMap", "tracker"),
}
DEFAULT_OBJECTS = SEED_OBJECTS | {
    ("Service", "p2p-proxy-headless"),
    ("Service", "p2p-tracker-headless"),
    ("PodDisruptionBudget", "p2p-proxy"),
    ("PodDisruptionBudget", "p2p-tracker"),
}
WORKLOADS = [("DaemonSet", "p2p-agent"), ("Deployment", "p2p-proxy"), ("Deployment", "p2p-tracker")]
MAIN_CONTAINER = {"p2p-agent": "agent", "p2p-proxy": "proxy", "p2p-tracker": "tracker"}

_QUANTITY = re.compile(r"^([0-9.]+)([a-zA-Z]*)$")
_SUFFIX = {
    "": 1, "m": Decimal("0.001"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
}  # fmt: skip


def quantity(value: str | int | float) -> Decimal:
    """A Kubernetes quantity as a number (CPU cores or bytes)."""
    match = _QUANTITY.match(str(value))
    assert match, f"not a quantity: {value!r}"
    return Decimal(match.group(1)) * _SUFFIX[match.group(2)]


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in spec["containers"] if c["name"] == name]
    assert len(found) == 1, f"no container {name}"
    return found[0]


def all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def port_number(c: dict[str, Any], port: str | int) -> int:
    if isinstance(port, int):
        return port
    numbers = [p["containerPort"] for p in c["ports"] if p["name"] == port]
    assert len(numbers) == 1, f"no port named {port}"
    return int(numbers[0])


# --- valid Kubernetes, lint-clean -----------------------------------------------------------


def test_every_rendered_object_is_valid_kubernetes(render: Render, value_set: tuple) -> None:
    _, values = value_set
    rendered = render(values)
    assert rendered.objects
    for obj in rendered.objects:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def test_lint_is_clean_in_strict_mode(value_set: tuple) -> None:
    _, values = value_set
    report = helm_python.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    # Severity 1 is informational ("icon is recommended"); warnings and errors are not allowed.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


# --- names, kinds, namespace ----------------------------------------------------------------


def test_default_install_creates_the_seed_objects_and_the_helpers(render: Render) -> None:
    assert render(REQUIRED).ids() == DEFAULT_OBJECTS


def test_mirror_mode_adds_only_its_configmap(render: Render) -> None:
    values = merged(REQUIRED, {"mirror": {"enabled": True}})
    assert render(values).ids() == DEFAULT_OBJECTS | {("ConfigMap", "p2p-mirror")}


@pytest.mark.parametrize("namespace", ["kube-system", "p2p-system"])
def test_every_object_goes_to_the_release_namespace(render: Render, namespace: str) -> None:
    rendered = render(merged(REQUIRED, {"mirror": {"enabled": True}}), namespace=namespace)
    assert {o["metadata"]["namespace"] for o in rendered.objects} == {namespace}
    assert f"namespace {namespace}" in rendered.notes


def test_namespace_override_wins_over_the_release_namespace(render: Render) -> None:
    rendered = render(merged(REQUIRED, {"namespaceOverride": "p2p"}), namespace="default")
    assert {o["metadata"]["namespace"] for o in rendered.objects} == {"p2p"}


def test_object_names_do_not_depend_on_the_release_name(render: Render) -> None:
    assert render(REQUIRED, name="other").ids() == DEFAULT_OBJECTS


# --- resources ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "name", "request_cpu", "request_bytes", "limit_cpu", "limit_bytes"),
    [
        ("DaemonSet", "p2p-agent", "0.2", 0.2e9, "4", 2e9),
        ("Deployment", "p2p-proxy", "0.5", 0.5e9, "4", 4e9),
        ("Deployment", "p2p-tracker", "0.5", 0.5e9, "2", 4e9),
    ],
)
def test_default_resources_are_the_seeds(
    render: Render,
    kind: str,
    name: str,
    request_cpu: str,
    request_bytes: float,
    limit_cpu: str,
    limit_bytes: float,
) -> None:
    resources = container(render(REQUIRED).pod_spec(kind, name), MAIN_CONTAINER[name])["resources"]
    # GB means 10^9 bytes throughout: Kubernetes' decimal M and G suffixes, not Mi/Gi.
    assert quantity(resources["requests"]["cpu"]) == Decimal(request_cpu)
    assert quantity(resources["requests"]["memory"]) == Decimal(int(request_bytes))
    assert quantity(resources["limits"]["cpu"]) == Decimal(limit_cpu)
    assert quantity(resources["limits"]["memory"]) == Decimal(int(limit_bytes))
    for amounts in resources.values():
        assert not str(amounts["memory"]).endswith("i")


def test_every_container_has_requests_and_limits(render: Render, value_set: tuple) -> None:
    rendered = render(value_set[1])
    for kind, name in WORKLOADS:
        for c in all_containers(rendered.pod_spec(kind, name)):
            assert set(c["resources"]) == {"requests", "limits"}, c["name"]
            assert {"cpu", "memory"} <= set(c["resources"]["limits"]), c["name"]


# --- node selection and spreading -----------------------------------------------------------


def test_proxies_and_trackers_run_only_on_labelled_nodes(render: Render) -> None:
    rendered = render(REQUIRED)
    proxy = rendered.pod_spec("Deployment", "p2p-proxy")
    tracker = rendered.pod_spec("Deployment", "p2p-tracker")
    assert proxy["nodeSelector"] == {"proxy": "p2p-proxy", "kubernetes.io/os": "linux"}
    assert tracker["nodeSelector"] == {"tracker": "p2p-tracker", "kubernetes.io/os": "linux"}
    assert "tolerations" not in proxy
    assert "tolerations" not in tracker


def test_proxies_never_share_a_node_and_trackers_prefer_not_to(render: Render) -> None:
    rendered = render(REQUIRED)
    for name, rule in [
        ("p2p-proxy", "requiredDuringSchedulingIgnoredDuringExecution"),
        ("p2p-tracker", "preferredDuringSchedulingIgnoredDuringExecution"),
    ]:
        deployment = rendered.get("Deployment", name)
        anti = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
        assert list(anti) == [rule]
        (term,) = anti[rule]
        term = term.get("podAffinityTerm", term)
        assert term["topologyKey"] == "kubernetes.io/hostname"
        assert term["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_agent_tolerates_every_taint_by_default(render: Render) -> None:
    spec = render(REQUIRED).pod_spec("DaemonSet", "p2p-agent")
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert "affinity" not in spec
    assert spec["priorityClassName"] == "system-node-critical"


def test_node_selection_is_configurable(render: Render) -> None:
    values = VALUE_SETS["everything-changed"]
    rendered = render(values)
    agent = rendered.pod_spec("DaemonSet", "p2p-agent")
    proxy = rendered.pod_spec("Deployment", "p2p-proxy")
    tracker = rendered.pod_spec("Deployment", "p2p-tracker")
    assert agent["tolerations"] == values["agent"]["tolerations"]
    assert agent["nodeSelector"] == {"kubernetes.io/os": "linux", "node-pool": "general"}
    assert "priorityClassName" not in agent
    assert proxy["nodeSelector"] == {"role": "p2p-proxy", "kubernetes.io/os": "linux"}
    assert proxy["tolerations"] == values["proxy"]["tolerations"]
    assert proxy["priorityClassName"] == "system-cluster-critical"
    assert tracker["nodeSelector"] == {"role": "p2p-tracker"}
    assert tracker["tolerations"] == values["tracker"]["tolerations"]
    assert tracker["priorityClassName"] == "p2p-tracker"


@pytest.mark.parametrize(("proxies", "trackers"), [(1, 1), (5, 3), (12, 2)])
def test_replicas(render: Render, proxies: int, trackers: int) -> None:
    values = merged(REQUIRED, {"proxy": {"replicas": proxies}, "tracker": {"replicas": trackers}})
    rendered = render(values)
    assert rendered.get("Deployment", "p2p-proxy")["spec"]["replicas"] == proxies
    assert rendered.get("Deployment", "p2p-tracker")["spec"]["replicas"] == trackers


# --- network --------------------------------------------------------------------------------


def test_agent_uses_the_host_network_and_cluster_dns(render: Render) -> None:
    spec = render(REQUIRED).pod_spec("DaemonSet", "p2p-agent")
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    ports = {p["name"]: p for p in container(spec, "agent")["ports"]}
    assert {n: (p["containerPort"], p["hostPort"]) for n, p in ports.items()} == {
        "registry": (5004, 5004),
        "bittorrent": (6881, 6881),
        "metrics": (5014, 5014),
    }


def test_proxy_uses_the_host_network_and_its_seed_ports(render: Render) -> None:
    spec = render(REQUIRED).pod_spec("Deployment", "p2p-proxy")
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    ports = {
        p["name"]: (p["containerPort"], p["hostPort"]) for p in container(spec, "proxy")["ports"]
    }
    assert ports == {"http": (5005, 5005), "bittorrent": (6882, 6882)}


def test_tracker_is_an_ordinary_pod_on_6969(render: Render) -> None:
    spec = render(REQUIRED).pod_spec("Deployment", "p2p-tracker")
    assert not spec.get("hostNetwork", False)
    ports = container(spec, "tracker")["ports"]
    assert [(p["name"], p["containerPort"], p.get("protocol", "TCP")) for p in ports] == [
        ("http", 6969, "TCP"),
        ("udp", 6969, "UDP"),  # BEP 15 beside HTTP (tracker.udp, on by default)
    ]
    assert not any("hostPort" in p for p in ports)


def test_services_and_headless_services(render: Render, value_set: tuple) -> None:
    rendered = render(value_set[1])
    for component, deployment in [("proxy", "p2p-proxy"), ("tracker", "p2p-tracker")]:
        workload = rendered.get("Deployment", deployment)
        pod_labels = workload["spec"]["template"]["metadata"]["labels"]
        main = container(workload["spec"]["template"]["spec"], component)
        plain = rendered.get("Service", f"p2p-{component}")
        headless = rendered.get("Service", f"p2p-{component}-headless")
        assert plain["spec"].get("clusterIP") != "None"
        assert headless["spec"]["clusterIP"] == "None"
        assert headless["spec"]["publishNotReadyAddresses"] is False
        for service in (plain, headless):
            assert service["spec"]["selector"].items() <= pod_labels.items()
            for port in service["spec"]["ports"]:
                assert port_number(main, port["targetPort"]) == port["port"]
        assert any(p["name"] == "http" for p in plain["spec"]["ports"])


def test_ports_are_configurable(render: Render) -> None:
    rendered = render(VALUE_SETS["everything-changed"])
    agent = container(rendered.pod_spec("DaemonSet", "p2p-agent"), "agent")
    proxy = container(rendered.pod_spec("Deployment", "p2p-proxy"), "proxy")
    tracker = container(rendered.pod_spec("Deployment", "p2p-tracker"), "tracker")
    assert sorted(p["hostPort"] for p in agent["ports"]) == [15004, 15014, 16881]
    assert sorted(p["hostPort"] for p in proxy["ports"]) == [15005, 16882]
    assert [p["containerPort"] for p in tracker["ports"]] == [16969, 16969]  # TCP and UDP
    assert rendered.get("Service", "p2p-tracker")["spec"]["ports"][0]["port"] == 16969


# --- storage --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "name", "path"),
    [("DaemonSet", "p2p-agent", "/p2p_agent_data"), ("Deployment", "p2p-proxy", "/p2p_proxy_data")],
)
def test_data_directories_are_host_paths(render: Render, kind: str, name: str, path: str) -> None:
    spec = render(REQUIRED).pod_spec(kind, name)
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["data"]["hostPath"] == {"path": path, "type": "DirectoryOrCreate"}
    mounts = {m["name"]: m for m in container(spec, MAIN_CONTAINER[name])["volumeMounts"]}
    assert mounts["data"]["mountPath"] == path
    assert not mounts["data"].get("readOnly", False)


def test_tracker_keeps_no_data(render: Render) -> None:
    spec = render(REQUIRED).pod_spec("Deployment", "p2p-tracker")
    assert not [v for v in spec["volumes"] if "hostPath" in v]


def test_data_directories_are_configurable(render: Render) -> None:
    rendered = render(VALUE_SETS["everything-changed"])
    for kind, name, path in [
        ("DaemonSet", "p2p-agent", "/var/lib/p2p-agent"),
        ("Deployment", "p2p-proxy", "/var/lib/p2p-proxy"),
    ]:
        volumes = {v["name"]: v for v in rendered.pod_spec(kind, name)["volumes"]}
        assert volumes["data"]["hostPath"]["path"] == path


# --- configuration mounts -------------------------------------------------------------------


def test_each_service_runs_its_console_script_on_the_mounted_configmap(
    render: Render, value_set: tuple
) -> None:
    rendered = render(value_set[1])
    for (kind, name), component in zip(WORKLOADS, ["agent", "proxy", "tracker"], strict=True):
        spec = rendered.pod_spec(kind, name)
        main = container(spec, component)
        assert main["command"] == [f"p2p-{component}"]
        assert main["args"] == ["--config", f"/etc/p2p/{component}.yaml"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["config"]["configMap"] == {"name": component}
        (mount,) = [m for m in main["volumeMounts"] if m["name"] == "config"]
        # A directory mount: kubelet swaps the ..data symlink on a ConfigMap change, which a
        # subPath mount would never see.
        assert mount == {"name": "config", "mountPath": "/etc/p2p", "readOnly": True}


def test_a_rate_change_does_not_touch_the_agent_daemonset(render: Render) -> None:
    before = render(REQUIRED)
    after = render(merged(REQUIRED, {"downloadRate": "20MB", "uploadRate": "5MB/s"}))
    assert before.get("ConfigMap", "agent") != after.get("ConfigMap", "agent")
    # Same DaemonSet, byte for byte: helm upgrade changes no pod template, so no agent restarts.
    assert before.get("DaemonSet", "p2p-agent") == after.get("DaemonSet", "p2p-agent")
    annotations = before.get("DaemonSet", "p2p-agent")["spec"]["template"]["metadata"][
        "annotations"
    ]
    assert "checksum/config" not in annotations


@pytest.mark.parametrize(
    "change",
    [
        {"agent": {"cacheSize": "99GB"}},
        {"agent": {"cacheHighWatermark": 90, "cacheLowWatermark": 60}},
        {"agent": {"cacheMaxUnused": "7d"}},
        {"agent": {"config": {"cacheSweepInterval": "10s"}}},
    ],
)
def test_a_cache_policy_change_does_not_touch_the_agent_daemonset(
    render: Render, change: dict
) -> None:
    before = render(REQUIRED)
    after = render(merged(REQUIRED, change))
    # The agents apply the new policy from their ConfigMap volume: no pod restarts.
    assert before.get("ConfigMap", "agent") != after.get("ConfigMap", "agent")
    assert before.get("DaemonSet", "p2p-agent") == after.get("DaemonSet", "p2p-agent")


@pytest.mark.parametrize(
    "change",
    [
        {"registry": "other.example.com"},
        {"agent": {"dataDir": "/var/lib/p2p"}},
        {"logLevel": "debug"},
        {"agent": {"config": {"fallbackAfter": 3}}},
    ],
)
def test_other_agent_config_changes_roll_the_agents(render: Render, change: dict) -> None:
    def template(values: dict) -> dict:
        return render(values).get("DaemonSet", "p2p-agent")["spec"]["template"]

    assert template(REQUIRED) != template(merged(REQUIRED, change))


@pytest.mark.parametrize(
    ("name", "change"),
    [
        ("p2p-proxy", {"proxy": {"cacheSize": "1TB"}}),
        ("p2p-tracker", {"tracker": {"config": {"peerExpiry": 60}}}),
    ],
)
def test_proxy_and_tracker_roll_on_config_change(render: Render, name: str, change: dict) -> None:
    def checksum(values: dict) -> str:
        template = render(values).get("Deployment", name)["spec"]["template"]
        return str(template["metadata"]["annotations"]["checksum/config"])

    assert checksum(REQUIRED) != checksum(merged(REQUIRED, change))
    assert checksum(REQUIRED) == checksum(merged(REQUIRED, {"downloadRate": "1MB"}))


# --- probes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "name", "port"),
    [
        ("DaemonSet", "p2p-agent", 5014),
        ("Deployment", "p2p-proxy", 5005),
        ("Deployment", "p2p-tracker", 6969),
    ],
)
def test_probes_use_the_health_endpoints(render: Render, kind: str, name: str, port: int) -> None:
    main = container(render(REQUIRED).pod_spec(kind, name), MAIN_CONTAINER[name])
    readiness = main["readinessProbe"]["httpGet"]
    liveness = main["livenessProbe"]["httpGet"]
    assert readiness["path"] == "/readyz"
    assert liveness["path"] == "/healthz"
    assert port_number(main, readiness["port"]) == port
    assert port_number(main, liveness["port"]) == port
    if "startupProbe" in main:
        assert main["startupProbe"]["httpGet"]["path"] == "/healthz"


# --- security -------------------------------------------------------------------------------


def test_least_privilege(render: Render, value_set: tuple) -> None:
    values = value_set[1]
    uid = values.get("securityContext", {}).get("runAsUser", 10001)
    rendered = render(values)
    for kind, name in WORKLOADS:
        spec = rendered.pod_spec(kind, name)
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == uid
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert not spec.get("hostPID")
        assert not spec.get("hostIPC")
        for c in all_containers(spec):
            context = c["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, c["name"]
            assert context["privileged"] is False, c["name"]
            assert context["readOnlyRootFilesystem"] is True, c["name"]
            assert context["capabilities"]["drop"] == ["ALL"], c["name"]
            if c["name"] == "data-dir-owner":
                # Root, but only to chown the hostPath directory.
                assert context["runAsUser"] == 0
                assert sorted(context["capabilities"]["add"]) == [
                    "CHOWN",
                    "DAC_READ_SEARCH",
                    "FOWNER",
                ]
            elif c["name"] in ("mirror-setup", "mirror-config"):
                # Root owns containerd's config directory; no capability is needed to write it.
                assert context["runAsUser"] == 0
                assert "add" not in context["capabilities"]
            else:
                assert c["name"] == MAIN_CONTAINER[name]
                assert context["runAsNonRoot"] is True
                assert context["runAsUser"] == uid
                assert "add" not in context["capabilities"]


def test_data_dir_owner_init_container(render: Render) -> None:
    rendered = render(REQUIRED)
    for kind, name, path in [
        ("DaemonSet", "p2p-agent", "/p2p_agent_data"),
        ("Deployment", "p2p-proxy", "/p2p_proxy_data"),
    ]:
        spec = rendered.pod_spec(kind, name)
        init = {c["name"]: c for c in spec["initContainers"]}["data-dir-owner"]
        env = {e["name"]: e["value"] for e in init["env"]}
        assert env == {"P2P_DATA_DIR": path, "P2P_UID": "10001", "P2P_GID": "10001"}
        assert init["image"] == container(spec, MAIN_CONTAINER[name])["image"]
    assert "initContainers" not in rendered.pod_spec("Deployment", "p2p-tracker")
    off = render(VALUE_SETS["everything-changed"])
    assert "initContainers" not in off.pod_spec("Deployment", "p2p-proxy")
    assert [c["name"] for c in off.pod_spec("DaemonSet", "p2p-agent")["initContainers"]] == [
        "mirror-setup"
    ]


def test_writable_tmp_beside_the_read_only_root(render: Render) -> None:
    rendered = render(REQUIRED)
    for kind, name in WORKLOADS:
        spec = rendered.pod_spec(kind, name)
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert "emptyDir" in volumes["tmp"]
        mounts = {m["mountPath"] for m in container(spec, MAIN_CONTAINER[name])["volumeMounts"]}
        assert "/tmp" in mounts


# --- labels, disruption budgets, updates ----------------------------------------------------


def test_recommended_labels_everywhere(render: Render, value_set: tuple) -> None:
    rendered = render(value_set[1])
    for obj in rendered.objects:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "p2p"
        assert labels["app.kubernetes.io/instance"] == "p2p"
        assert labels["app.kubernetes.io/component"] in {"agent", "proxy", "tracker", "prefetch"}
        assert labels["app.kubernetes.io/version"] == "0.1.0"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/part-of"] == "p2p"
    for kind, name in WORKLOADS:
        workload = rendered.get(kind, name)
        selector = workload["spec"]["selector"]["matchLabels"]
        assert set(selector) == {
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/component",
        }
        assert selector.items() <= workload["spec"]["template"]["metadata"]["labels"].items()


def test_disruption_budgets_cover_proxies_and_trackers(render: Render) -> None:
    rendered = render(REQUIRED)
    for name in ("p2p-proxy", "p2p-tracker"):
        pdb = rendered.get("PodDisruptionBudget", name)
        assert pdb["spec"]["maxUnavailable"] == 1
        pods = rendered.get("Deployment", name)["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= pods.items()
    changed = render(VALUE_SETS["everything-changed"])
    assert changed.get("PodDisruptionBudget", "p2p-proxy")["spec"]["maxUnavailable"] == "50%"
    assert changed.get("PodDisruptionBudget", "p2p-tracker")["spec"]["maxUnavailable"] == 0


def test_agent_rolling_update_is_bounded_and_lets_pulls_finish(render: Render) -> None:
    daemonset = render(REQUIRED).get("DaemonSet", "p2p-agent")
    strategy = daemonset["spec"]["updateStrategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == "10%"
    assert strategy["rollingUpdate"]["maxSurge"] == 0
    assert daemonset["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 60

    changed = render(VALUE_SETS["everything-changed"]).get("DaemonSet", "p2p-agent")
    assert changed["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == 3
    assert changed["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 300


def test_proxy_update_frees_the_host_ports_first(render: Render) -> None:
    rendered = render(REQUIRED)
    proxy = rendered.get("Deployment", "p2p-proxy")["spec"]
    assert proxy["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    assert proxy["template"]["spec"]["terminationGracePeriodSeconds"] >= 60


# --- images ---------------------------------------------------------------------------------


def test_images_default_to_the_app_version(render: Render) -> None:
    rendered = render(REQUIRED)
    for kind, name in WORKLOADS:
        spec = rendered.pod_spec(kind, name)
        for c in all_containers(spec):
            assert c["image"] == f"p2p/{MAIN_CONTAINER[name]}:0.1.0", c["name"]
            assert c["imagePullPolicy"] == "IfNotPresent"
        assert "imagePullSecrets" not in spec


def test_images_are_configurable(render: Render) -> None:
    spec = render(VALUE_SETS["everything-changed"]).pod_spec("DaemonSet", "p2p-agent")
    for c in all_containers(spec):
        assert c["image"] == "mirror.example.com/p2p/agent:1.2.3"
        assert c["imagePullPolicy"] == "Always"
    assert spec["imagePullSecrets"] == [{"name": "p2p-images"}]


def test_metrics_annotations(render: Render) -> None:
    rendered = render(REQUIRED)
    for (kind, name), port in zip(WORKLOADS, ["5014", "5005", "6969"], strict=True):
        annotations = rendered.get(kind, name)["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == port
        assert annotations["prometheus.io/path"] == "/metrics"
    changed = render(VALUE_SETS["everything-changed"])
    annotations = changed.get("DaemonSet", "p2p-agent")["spec"]["template"]["metadata"][
        "annotations"
    ]
    assert not any(key.startswith("prometheus.io/") for key in annotations)
    assert annotations["example.com/team"] == "platform"
