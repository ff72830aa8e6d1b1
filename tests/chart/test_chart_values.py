"""values.schema.json: bad values stop install and lint with a message naming the key."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import helm_python
import pytest

from tests.chart.conftest import CHART, KUBE_VERSION, REQUIRED, merged

HOSTNAME = "kubernetes.io/hostname"
SECRET_REF = {"secretKeyRef": {"name": "s", "key": "k"}}


def bad(change: dict[str, Any], key: str, name: str, *, base: dict[str, Any] = REQUIRED) -> Any:
    """A value set (``change`` over ``base``) that must be refused naming ``key``."""
    return pytest.param(merged(base, change), key, id=name)


BAD_VALUES = [
    bad({}, "/registry", "registry-missing", base={}),
    bad({"registry": ""}, "/registry", "registry-empty-string", base={}),
    bad({"registry": []}, "/registry", "registry-empty-list", base={}),
    bad({"registry": [""]}, "/registry/0", "registry-empty-entry", base={}),
    bad({"registry": "https://registry.example.com/team"}, "/registry", "registry-path", base={}),
    bad({"registry": "user:pw@registry.example.com"}, "/registry", "registry-credentials", base={}),
    bad({"registry": 5000}, "/registry", "registry-number", base={}),
    bad({"downloadRate": "12 parsecs"}, "/downloadRate", "rate-words"),
    bad({"uploadRate": "-5MB"}, "/uploadRate", "rate-negative-string"),
    bad({"uploadRate": -1}, "/uploadRate", "rate-negative"),
    bad({"downloadRate": True}, "/downloadRate", "rate-bool"),
    bad({"proxy": {"replicas": -1}}, "/proxy/replicas", "proxy-negative"),
    bad({"proxy": {"replicas": 0}}, "/proxy/replicas", "proxy-zero"),
    bad({"proxy": {"replicas": "two"}}, "/proxy/replicas", "proxy-string"),
    bad({"tracker": {"replicas": -3}}, "/tracker/replicas", "tracker-negative"),
    bad({"tracker": {"replicas": 1.5}}, "/tracker/replicas", "tracker-fraction"),
    bad({"registy": "typo.example.com"}, "registy", "unknown-top-level"),
    bad({"agent": {"replicas": 3}}, "replicas", "unknown-agent-key"),
    bad({"agent": {"cacheSize": "lots"}}, "/agent/cacheSize", "cache-size"),
    bad({"agent": {"cacheHighWatermark": 101}}, "/agent/cacheHighWatermark", "watermark-range"),
    bad({"agent": {"cacheLowWatermark": "80%"}}, "/agent/cacheLowWatermark", "watermark-string"),
    bad({"agent": {"cacheMaxUnused": "a week"}}, "/agent/cacheMaxUnused", "max-unused-words"),
    bad({"agent": {"cacheMaxUnused": -1}}, "/agent/cacheMaxUnused", "max-unused-negative"),
    bad(
        {"agent": {"config": {"cacheMaxUnused": "1d"}}},
        "/agent/config/cacheMaxUnused",
        "config-reserved-cache",
    ),
    bad({"agent": {"ports": {"peer": 70000}}}, "/agent/ports/peer", "port-range"),
    bad({"agent": {"dataDir": "relative/dir"}}, "/agent/dataDir", "data-dir"),
    bad({"agent": {"maxUnavailable": "0%"}}, "/agent/maxUnavailable", "max-unavailable"),
    bad(
        {"agent": {"config": {"downloadRate": "1MB"}}},
        "/agent/config/downloadRate",
        "config-reserved",
    ),
    bad(
        {"agent": {"resources": {"limits": {"memory": "2 GB"}}}},
        "/agent/resources/limits/memory",
        "quantity",
    ),
    bad(
        {"agent": {"image": {"pullPolicy": "Sometimes"}}}, "/agent/image/pullPolicy", "pull-policy"
    ),
    bad({"logLevel": "verbose"}, "/logLevel", "log-level"),
    bad({"logFormat": "xml"}, "/logFormat", "log-format"),
    bad({"mirror": {"enabled": "yes"}}, "/mirror/enabled", "mirror-enabled"),
    bad({"mirror": {"configPath": "certs.d"}}, "/mirror/configPath", "mirror-path"),
    bad({"securityContext": {"runAsUser": 0}}, "/securityContext/runAsUser", "root-user"),
    bad({"namespaceOverride": "Kube_System"}, "/namespaceOverride", "namespace"),
    # Per-component pod settings (issue 10, section 5).
    bad({"agent": {"image": {"digest": "sha256:abc"}}}, "/agent/image/digest", "digest-short"),
    bad({"proxy": {"image": {"digest": "latest"}}}, "/proxy/image/digest", "digest-tag"),
    bad(
        {"tracker": {"image": {"repository": "p2p/tracker@sha256:" + "a" * 64}}},
        "/tracker/image/repository",
        "digest-in-repository",
    ),
    bad({"agent": {"affinity": {"nodeAfinity": {}}}}, "nodeAfinity", "affinity-typo"),
    bad(
        {"proxy": {"affinity": {"podAntiAffinity": [{"topologyKey": HOSTNAME}]}}},
        "/proxy/affinity/podAntiAffinity",
        "affinity-list",
    ),
    bad(
        {
            "tracker": {
                "affinity": {
                    "podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{}]}
                }
            }
        },
        "/tracker/affinity/podAffinity/requiredDuringSchedulingIgnoredDuringExecution/0",
        "affinity-term-without-topology",
    ),
    bad(
        {
            "agent": {
                "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": []}}
            }
        },
        "/agent/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution",
        "node-affinity-list",
    ),
    bad({"agent": {"podLabels": {"tier": 5}}}, "/agent/podLabels/tier", "label-number"),
    bad({"proxy": {"podLabels": {"tier": "a b"}}}, "/proxy/podLabels/tier", "label-value"),
    bad({"proxy": {"podLabels": {"bad key!": "x"}}}, "bad key!", "label-key"),
    bad(
        {"tracker": {"podLabels": {"app.kubernetes.io/component": "x"}}},
        "/tracker/podLabels/app.kubernetes.io~1component",
        "label-chart-owned",
    ),
    bad({"agent": {"extraEnv": {"TZ": "UTC"}}}, "/agent/extraEnv", "env-map"),
    bad({"agent": {"extraEnv": [{"value": "UTC"}]}}, "/agent/extraEnv/0", "env-no-name"),
    bad(
        {"proxy": {"extraEnv": [{"name": "TZ", "value": 1}]}}, "/proxy/extraEnv/0/value", "env-int"
    ),
    bad({"proxy": {"extraEnv": [{"name": "A=B"}]}}, "/proxy/extraEnv/0/name", "env-name"),
    bad(
        {"tracker": {"extraEnv": [{"name": "TZ", "value": "UTC", "valueFrom": SECRET_REF}]}},
        "/tracker/extraEnv/0",
        "env-value-and-value-from",
    ),
    bad(
        {"agent": {"extraEnv": [{"name": "P2P_AGENT_DOWNLOAD_RATE", "value": "1MB"}]}},
        "/agent/extraEnv/0/name",
        "env-chart-owned",
    ),
    bad(
        {"tracker": {"extraEnv": [{"name": "P2P_TRACKER_LOG_FORMAT", "value": "text"}]}},
        "/tracker/extraEnv/0/name",
        "env-chart-owned-log-format",
    ),
    bad(
        {"agent": {"tolerations": [{"operator": "Exist"}]}},
        "/agent/tolerations/0/operator",
        "toleration-operator",
    ),
    bad(
        {"proxy": {"tolerations": [{"key": "a", "efect": "NoSchedule"}]}},
        "efect",
        "toleration-typo",
    ),
]


@pytest.mark.parametrize(("values", "key"), BAD_VALUES)
def test_install_refuses_bad_values_naming_the_key(
    chart: helm_python.Chart, values: dict[str, Any], key: str
) -> None:
    with pytest.raises(helm_python.HelmValuesError) as caught:
        chart.render(values, name="p2p", namespace="kube-system", is_install=True)
    assert key in str(caught.value)


LINTED = {
    "registry-missing",
    "registry-empty-list",
    "rate-words",
    "unknown-top-level",
    "proxy-negative",
}


@pytest.mark.parametrize(("values", "key"), [p for p in BAD_VALUES if p.id in LINTED])
def test_lint_reports_bad_values_naming_the_key(values: dict[str, Any], key: str) -> None:
    report = helm_python.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"]
    assert any(key in error for error in report["errors"])


@pytest.mark.parametrize(
    "values",
    [
        {"registry": "registry.example.com"},
        {"registry": "registry.example.com:5000"},
        {"registry": "http://10.1.2.3:5000"},
        {"registry": "https://registry.example.com/"},
        {"registry": ["a.example.com", "b.example.com"]},
        merged(REQUIRED, {"downloadRate": "20MB/s", "uploadRate": "1.5GB"}),
        merged(REQUIRED, {"downloadRate": 0, "uploadRate": 125_000_000}),
        merged(REQUIRED, {"agent": {"maxUnavailable": 1}}),
        merged(REQUIRED, {"agent": {"maxUnavailable": "100%"}}),
        merged(REQUIRED, {"agent": {"resources": {"limits": {"cpu": 2, "memory": "3Gi"}}}}),
        merged(REQUIRED, {"global": {"imageRegistry": "x"}}),
        merged(REQUIRED, {"agent": {"image": {"digest": "sha256:" + "0" * 64}}}),
        merged(REQUIRED, {"proxy": {"image": {"digest": "sha512:" + "f" * 128}}}),
        merged(REQUIRED, {"agent": {"nodeSelector": {"kubernetes.io/os": None}}}),
        merged(REQUIRED, {"agent": {"podLabels": {"example.com/team": "a.b-c_d", "x": ""}}}),
        merged(
            REQUIRED,
            {
                "proxy": {
                    "extraEnv": [
                        {"name": "TZ", "value": "UTC"},
                        {"name": "P2P_PROXY_AUTH_CACHE_TTL", "value": "30"},
                        {"name": "TOKEN", "valueFrom": SECRET_REF},
                        {
                            "name": "POD_IP",
                            "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
                        },
                    ]
                }
            },
        ),
        merged(
            REQUIRED,
            {
                "tracker": {
                    "affinity": {
                        "podAntiAffinity": {
                            "requiredDuringSchedulingIgnoredDuringExecution": [
                                {"topologyKey": HOSTNAME}
                            ]
                        }
                    },
                    "tolerations": [
                        {"operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 60}
                    ],
                }
            },
        ),
    ],
)
def test_good_values_are_accepted(chart: helm_python.Chart, values: dict[str, Any]) -> None:
    chart.render(values, name="p2p", namespace="kube-system", is_install=True)


def test_without_the_schema_the_templates_still_demand_a_registry(tmp_path: Path) -> None:
    # helm install --skip-schema-validation: the templates check the one required value too.
    copy = tmp_path / "p2p"
    shutil.copytree(CHART, copy)
    (copy / "values.schema.json").unlink()
    with helm_python.Chart.load(copy) as unchecked:
        for registry in ("", [], [" "]):
            with pytest.raises(
                helm_python.HelmRenderError, match="registry: set the registry domain"
            ):
                unchecked.render({"registry": registry}, name="p2p", namespace="kube-system")
