"""Rendering the chart with the real Helm engine (helm-python-sdk), offline.

``render(values, namespace=...)`` returns the objects a ``helm install`` would create, parsed;
renders are cached per value set because the Helm engine is the slow part.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "chart"
KUBE_VERSION = "1.30.0"
RELEASE = "p2p"

# The one value without a usable default: the registry to accelerate.
REQUIRED = {"registry": "registry.example.com"}

# Value sets every structural test runs against.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": REQUIRED,
    "mirror": {
        "registry": ["registry.example.com", "http://registry.internal:5000"],
        "mirror": {"enabled": True},
    },
    "several-registries": {
        "registry": ["registry.example.com", "https://ghcr.example.org", "10.0.0.7:5000"],
    },
    "rates-and-replicas": {
        "registry": "registry.example.com",
        "downloadRate": "20MB",
        "uploadRate": "50MiB/s",
        "proxy": {"replicas": 5},
        "tracker": {"replicas": 3},
    },
    "everything-changed": {
        "namespaceOverride": "p2p-system",
        "ipFamilyPolicy": "PreferDualStack",
        "ipFamilies": ["IPv6", "IPv4"],
        "clusterDomain": "corp.example",
        "registry": ["http://registry.internal:5000"],
        "downloadRate": 30_000_000,
        "uploadRate": "0",
        "logLevel": "debug",
        "logFormat": "text",
        "imagePullSecrets": [{"name": "p2p-images"}],
        "securityContext": {"runAsUser": 20000, "runAsGroup": 20001, "fixDataDirOwnership": False},
        "metrics": {"podAnnotations": False},
        "agent": {
            "image": {
                "repository": "mirror.example.com/p2p/agent",
                "tag": "1.2.3",
                "pullPolicy": "Always",
            },
            "ports": {"registry": 15004, "peer": 16881, "metrics": 15014},
            "loopback": "::1",
            "dataDir": "/var/lib/p2p-agent",
            "cacheSize": "80GiB",
            "cacheHighWatermark": 90,
            "cacheLowWatermark": 70,
            "cacheMaxUnused": "7d",
            "nodeSelector": {"node-pool": "general"},  # merged with kubernetes.io/os: linux
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {"key": "example.com/no-p2p", "operator": "DoesNotExist"}
                                ]
                            }
                        ]
                    }
                }
            },
            "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "priorityClassName": "",
            "maxUnavailable": 3,
            "terminationGracePeriodSeconds": 300,
            "podAnnotations": {"example.com/team": "platform"},
            "podLabels": {"example.com/team": "platform", "tier": "node"},
            "extraEnv": [
                {"name": "P2P_AGENT_FALLBACK_AFTER", "value": "7"},
                {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            ],
            "config": {"fallbackAfter": 5, "maxConnections": 50},
        },
        "proxy": {
            "replicas": 4,
            "image": {"digest": "sha256:" + "ab" * 32},
            "ports": {"http": 15005, "peer": 16882},
            "dataDir": "/var/lib/p2p-proxy",
            "cacheSize": "200GB",
            "uploadRate": "1GB",
            "nodeSelector": {"role": "p2p-proxy", "proxy": None},  # null drops a default key
            "tolerations": [{"key": "dedicated", "value": "p2p", "effect": "NoSchedule"}],
            "priorityClassName": "system-cluster-critical",
            "pdbMaxUnavailable": "50%",
            "affinity": {
                "nodeAffinity": {
                    "preferredDuringSchedulingIgnoredDuringExecution": [
                        {
                            "weight": 50,
                            "preference": {
                                "matchExpressions": [
                                    {
                                        "key": "example.com/egress",
                                        "operator": "In",
                                        "values": ["fast"],
                                    }
                                ]
                            },
                        }
                    ]
                },
                "podAntiAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": [
                        {
                            "topologyKey": "kubernetes.io/hostname",
                            "labelSelector": {"matchLabels": {"app": "registry-cache"}},
                        }
                    ]
                },
            },
            "podAnnotations": {"example.com/owner": "sre"},
            "podLabels": {"tier": "seed"},
            "extraEnv": [{"name": "P2P_PROXY_SHUTDOWN_TIMEOUT", "value": "60"}],
            "egressProxy": {
                "url": "http://proxy.corp.example:3128",
                "noProxy": [".corp.example", "10.0.0.0/8"],
            },
            "config": {"authCacheTtl": 30},
        },
        "tracker": {
            "replicas": 2,
            "ports": {"http": 16969},
            "udp": True,
            "image": {"tag": "1.2.3", "digest": "sha256:" + "cd" * 32},  # the digest wins
            # Both default labels dropped, the Linux one included.
            "nodeSelector": {"role": "p2p-tracker", "tracker": None, "kubernetes.io/os": None},
            "tolerations": [
                {"key": "dedicated", "operator": "Equal", "value": "p2p", "effect": "NoSchedule"}
            ],
            "priorityClassName": "p2p-tracker",
            "affinity": {
                "podAffinity": {
                    "preferredDuringSchedulingIgnoredDuringExecution": [
                        {
                            "weight": 10,
                            "podAffinityTerm": {
                                "topologyKey": "topology.kubernetes.io/zone",
                                "labelSelector": {"matchLabels": {"app": "monitoring"}},
                            },
                        }
                    ]
                }
            },
            "podAnnotations": {"example.com/owner": "sre"},
            "podLabels": {"tier": "control"},
            "extraEnv": [{"name": "TZ", "value": "UTC"}],
            "pdbMaxUnavailable": 0,
            "config": {"announceInterval": 30, "peerExpiry": 90},
        },
        "mirror": {
            "enabled": True,
            "configPath": "/etc/containerd/registries.d",
            "resyncSeconds": 5,
        },
        "prefetch": {
            "images": ["registry.example.com/team/app:1.0"],
            "nodeSelector": {"pool": "warm"},
            "platforms": ["linux/amd64"],
            "pullSecret": "registry-logins",
        },
    },
}


def merged(*layers: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge value layers, later layers winning (what several ``-f`` files do)."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merged(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


@dataclass
class Rendered:
    """The objects of one render, plus NOTES.txt."""

    objects: list[dict[str, Any]]
    notes: str

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [o for o in self.objects if o["kind"] == kind and o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
        return found[0]

    def ids(self) -> set[tuple[str, str]]:
        return {(o["kind"], o["metadata"]["name"]) for o in self.objects}

    def pod_spec(self, kind: str, name: str) -> dict[str, Any]:
        spec: dict[str, Any] = self.get(kind, name)["spec"]["template"]["spec"]
        return spec

    def config_file(self, name: str) -> str:
        data = self.get("ConfigMap", name)["data"]
        assert set(data) == {f"{name}.yaml"}, f"ConfigMap {name} holds {sorted(data)}"
        text: str = data[f"{name}.yaml"]
        return text


Render = Callable[..., Rendered]


@pytest.fixture(scope="session")
def chart() -> Iterator[helm_python.Chart]:
    with helm_python.Chart.load(CHART) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def render(chart: helm_python.Chart) -> Render:
    cache: dict[str, Rendered] = {}

    def _render(
        values: dict[str, Any] | None = None, *, namespace: str = "kube-system", name: str = RELEASE
    ) -> Rendered:
        key = json.dumps([values, namespace, name], sort_keys=True)
        if key not in cache:
            manifests = chart.render(values, name=name, namespace=namespace, is_install=True)
            objects: list[dict[str, Any]] = []
            notes = ""
            for path, text in sorted(manifests.items()):
                if path.endswith("NOTES.txt"):
                    notes = text
                    continue
                assert path.endswith(".yaml"), path
                objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
            cache[key] = Rendered(objects, notes)
        return copy.deepcopy(cache[key])

    return _render


@pytest.fixture(params=sorted(VALUE_SETS))
def value_set(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    """Each named value set in turn."""
    return request.param, VALUE_SETS[request.param]
