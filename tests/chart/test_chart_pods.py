"""Per-component pod settings users reach for (issue 10, section 5): Linux-only scheduling,
affinity merged with the chart's own anti-affinity, tolerations, priority classes, pod labels
and annotations, extra environment variables, image digests, and the JSON log default."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from p2p_agent.settings import AgentSettings
from p2p_common.settings import ServiceSettings
from p2p_proxy.settings import ProxySettings
from tests.chart.conftest import (
    CHART,
    KUBE_VERSION,
    REPO,
    REQUIRED,
    VALUE_SETS,
    Render,
    Rendered,
    merged,
)

WORKLOADS = {
    "agent": ("DaemonSet", "p2p-agent"),
    "proxy": ("Deployment", "p2p-proxy"),
    "tracker": ("Deployment", "p2p-tracker"),
}
COMPONENTS = sorted(WORKLOADS)
HOSTNAME = "kubernetes.io/hostname"
REQUIRED_TERMS = "requiredDuringSchedulingIgnoredDuringExecution"
PREFERRED_TERMS = "preferredDuringSchedulingIgnoredDuringExecution"


def pod(rendered: Rendered, component: str) -> dict[str, Any]:
    """The pod template of a component's workload."""
    template: dict[str, Any] = rendered.get(*WORKLOADS[component])["spec"]["template"]
    return template


def containers(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in [*spec.get("initContainers", []), *spec["containers"]]}


def own_spreading_term(rendered: Rendered, component: str) -> dict[str, Any]:
    selector = rendered.get(*WORKLOADS[component])["spec"]["selector"]["matchLabels"]
    return {"topologyKey": HOSTNAME, "labelSelector": {"matchLabels": selector}}


# --- Linux nodes only ----------------------------------------------------------------------


@pytest.mark.parametrize("component", COMPONENTS)
def test_every_component_runs_only_on_linux_nodes_by_default(
    render: Render, component: str
) -> None:
    rendered = render(REQUIRED)
    assert pod(rendered, component)["spec"]["nodeSelector"]["kubernetes.io/os"] == "linux"
    # Also in mirror mode, whose containers run a shell script on the node.
    mirror = render(merged(REQUIRED, {"mirror": {"enabled": True}}))
    assert pod(mirror, component)["spec"]["nodeSelector"]["kubernetes.io/os"] == "linux"


def test_the_linux_selector_can_be_dropped_or_kept_beside_other_labels(render: Render) -> None:
    values = merged(
        REQUIRED,
        {
            "agent": {"nodeSelector": {"kubernetes.io/os": None}},
            "proxy": {"nodeSelector": {"kubernetes.io/os": None}},
            "tracker": {"nodeSelector": {"pool": "infra"}},
        },
    )
    rendered = render(values)
    assert "nodeSelector" not in pod(rendered, "agent")["spec"]
    assert pod(rendered, "proxy")["spec"]["nodeSelector"] == {"proxy": "p2p-proxy"}
    assert pod(rendered, "tracker")["spec"]["nodeSelector"] == {
        "tracker": "p2p-tracker",
        "kubernetes.io/os": "linux",
        "pool": "infra",
    }


def test_notes_ask_to_label_nodes_only_with_labels_people_set(render: Render) -> None:
    notes = render(REQUIRED).notes
    assert "kubectl label nodes NODE proxy=p2p-proxy\n" in notes
    assert "kubectl label nodes NODE tracker=p2p-tracker\n" in notes
    assert "kubernetes.io/os" not in notes


# --- affinity --------------------------------------------------------------------------------


def test_no_affinity_for_the_agent_unless_given(render: Render) -> None:
    assert "affinity" not in pod(render(REQUIRED), "agent")["spec"]
    values = VALUE_SETS["everything-changed"]
    assert pod(render(values), "agent")["spec"]["affinity"] == values["agent"]["affinity"]


def test_proxy_affinity_keeps_the_one_proxy_per_node_rule(render: Render) -> None:
    values = VALUE_SETS["everything-changed"]
    rendered = render(values)
    affinity = pod(rendered, "proxy")["spec"]["affinity"]
    given = values["proxy"]["affinity"]
    assert affinity["nodeAffinity"] == given["nodeAffinity"]
    # The user's required term first, then the chart's: two proxies never share a node.
    assert affinity["podAntiAffinity"] == {
        REQUIRED_TERMS: [
            *given["podAntiAffinity"][REQUIRED_TERMS],
            own_spreading_term(rendered, "proxy"),
        ]
    }


def test_proxy_affinity_with_only_preferred_anti_affinity_still_requires_spreading(
    render: Render,
) -> None:
    preferred = [{"weight": 5, "podAffinityTerm": {"topologyKey": "topology.kubernetes.io/zone"}}]
    rendered = render(
        merged(REQUIRED, {"proxy": {"affinity": {"podAntiAffinity": {PREFERRED_TERMS: preferred}}}})
    )
    anti = pod(rendered, "proxy")["spec"]["affinity"]["podAntiAffinity"]
    assert anti == {
        PREFERRED_TERMS: preferred,
        REQUIRED_TERMS: [own_spreading_term(rendered, "proxy")],
    }


def test_tracker_affinity_keeps_the_preferred_spreading(render: Render) -> None:
    values = VALUE_SETS["everything-changed"]
    rendered = render(values)
    affinity = pod(rendered, "tracker")["spec"]["affinity"]
    assert affinity["podAffinity"] == values["tracker"]["affinity"]["podAffinity"]
    assert affinity["podAntiAffinity"] == {
        PREFERRED_TERMS: [
            {"weight": 100, "podAffinityTerm": own_spreading_term(rendered, "tracker")}
        ]
    }
    # A preferred anti-affinity of the user's own is kept beside the chart's.
    theirs = {"weight": 20, "podAffinityTerm": {"topologyKey": "topology.kubernetes.io/zone"}}
    rendered = render(
        merged(
            REQUIRED, {"tracker": {"affinity": {"podAntiAffinity": {PREFERRED_TERMS: [theirs]}}}}
        )
    )
    terms = pod(rendered, "tracker")["spec"]["affinity"]["podAntiAffinity"][PREFERRED_TERMS]
    assert terms == [
        theirs,
        {"weight": 100, "podAffinityTerm": own_spreading_term(rendered, "tracker")},
    ]


# --- tolerations, priority classes, annotations, labels ------------------------------------


@pytest.mark.parametrize("component", COMPONENTS)
def test_tolerations_priority_class_and_annotations_per_component(
    render: Render, component: str
) -> None:
    toleration = {"key": "team", "operator": "Equal", "value": "p2p", "effect": "NoExecute"}
    values = merged(
        REQUIRED,
        {
            component: {
                "tolerations": [toleration],
                "priorityClassName": "p2p-critical",
                "podAnnotations": {"example.com/owner": "sre"},
            }
        },
    )
    template = pod(render(values), component)
    assert template["spec"]["tolerations"] == [toleration]
    assert template["spec"]["priorityClassName"] == "p2p-critical"
    assert template["metadata"]["annotations"]["example.com/owner"] == "sre"
    assert template["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    # The other components keep their own.
    for other in set(COMPONENTS) - {component}:
        assert toleration not in pod(render(values), other)["spec"].get("tolerations", [])


@pytest.mark.parametrize("component", COMPONENTS)
def test_pod_labels_are_added_and_selectors_stay(render: Render, component: str) -> None:
    default = render(REQUIRED)
    values = merged(REQUIRED, {component: {"podLabels": {"example.com/team": "platform"}}})
    rendered = render(values)
    workload = rendered.get(*WORKLOADS[component])
    labels = workload["spec"]["template"]["metadata"]["labels"]
    before = pod(default, component)["metadata"]["labels"]
    assert labels == {**before, "example.com/team": "platform"}
    # Selectors never change (they are immutable), and still select the pods.
    assert workload["spec"]["selector"] == default.get(*WORKLOADS[component])["spec"]["selector"]
    assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # Only the pods: the workload and its Services keep the chart's labels.
    assert "example.com/team" not in workload["metadata"]["labels"]
    if component != "agent":
        for service in (f"p2p-{component}", f"p2p-{component}-headless"):
            selector = rendered.get("Service", service)["spec"]["selector"]
            assert selector.items() <= labels.items()


# --- extra environment ---------------------------------------------------------------------


def test_extra_env_goes_to_the_main_container_only(render: Render) -> None:
    values = VALUE_SETS["everything-changed"]
    rendered = render(values)
    for component in COMPONENTS:
        spec = pod(rendered, component)["spec"]
        by_name = containers(spec)
        assert by_name[component]["env"] == values[component]["extraEnv"]
        for name, c in by_name.items():
            if name != component:
                assert not {e["name"] for e in c.get("env", [])} & {
                    e["name"] for e in values[component]["extraEnv"]
                }, name
    for component in COMPONENTS:
        assert "env" not in containers(pod(render(REQUIRED), component)["spec"])[component]


def test_extra_env_reaches_the_services_settings(render: Render, tmp_path: Path) -> None:
    # The services read P2P_<SERVICE>_* variables over their file; a plain value is what the
    # kubelet puts into the environment.
    rendered = render(VALUE_SETS["everything-changed"])
    cases: list[tuple[str, type[ServiceSettings], str, float]] = [
        ("agent", AgentSettings, "fallback_after", 7.0),  # the file says 5
        ("proxy", ProxySettings, "shutdown_timeout", 60.0),
    ]
    for component, settings_class, field, expected in cases:
        env = containers(pod(rendered, component)["spec"])[component]["env"]
        environ = {e["name"]: e["value"] for e in env if "value" in e}
        path = tmp_path / f"{component}.yaml"
        path.write_text(rendered.config_file(component))
        settings = settings_class.load(path, environ=environ)
        assert getattr(settings, field) == expected


# --- images ---------------------------------------------------------------------------------


def test_an_image_digest_replaces_the_tag(render: Render) -> None:
    digest = "sha256:" + "0123456789abcdef" * 4
    values = merged(
        REQUIRED,
        {
            "securityContext": {"fixDataDirOwnership": True},
            "mirror": {"enabled": True},
            "agent": {"image": {"repository": "registry.example.com/p2p/agent", "digest": digest}},
            "proxy": {"image": {"tag": "9.9.9", "digest": digest}},
        },
    )
    rendered = render(values)
    # Every container of the agent pod runs the agent image: init and mirror containers too.
    for name, c in containers(pod(rendered, "agent")["spec"]).items():
        assert c["image"] == f"registry.example.com/p2p/agent@{digest}", name
    for name, c in containers(pod(rendered, "proxy")["spec"]).items():
        assert c["image"] == f"p2p/proxy@{digest}", name
    assert containers(pod(rendered, "tracker")["spec"])["tracker"]["image"] == "p2p/tracker:0.1.0"
    changed = render(VALUE_SETS["everything-changed"])
    assert containers(pod(changed, "tracker")["spec"])["tracker"]["image"] == (
        "p2p/tracker@sha256:" + "cd" * 32
    )


# --- logs -----------------------------------------------------------------------------------


def test_the_services_log_json_by_default(render: Render) -> None:
    for component in COMPONENTS:
        config = yaml.safe_load(render(REQUIRED).config_file(component))
        assert config["logFormat"] == "json", component
        text = yaml.safe_load(
            render(merged(REQUIRED, {"logFormat": "text"})).config_file(component)
        )
        assert text["logFormat"] == "text", component


# --- the documented examples ----------------------------------------------------------------


def test_the_values_examples_in_the_install_guide_install(render: Render) -> None:
    guide = (REPO / "docs" / "install.md").read_text()
    top_level = set(yaml.safe_load((CHART / "values.yaml").read_text()))
    examples = [
        block
        for block in (yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", guide, re.S))
        if isinstance(block, dict) and set(block) <= top_level
    ]
    assert len(examples) >= 3  # the values file, the Linux selector, the pod settings
    for example in examples:
        rendered = render(merged(REQUIRED, example))
        for obj in rendered.objects:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def test_notes_say_how_to_see_what_agents_and_proxies_do(render: Render) -> None:
    notes = render(REQUIRED).notes
    assert "kubectl -n kube-system exec POD -c agent -- p2p-agent status\n" in notes
    assert "kubectl -n kube-system exec deploy/p2p-proxy -- p2p-proxy status\n" in notes
