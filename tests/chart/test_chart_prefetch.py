"""prefetch: a DaemonSet on the selected nodes runs ``p2p-agent prefetch`` against the node's
agent, once per change of the image list."""

from __future__ import annotations

from p2p_agent.prefetch_cli import main as prefetch_main
from tests.chart.conftest import REQUIRED, Render, merged

IMAGES = ["registry.example.com/team/app:1.0", "team/worker@sha256:" + "ab" * 32]
PREFETCH = merged(
    REQUIRED,
    {
        "prefetch": {
            "images": IMAGES,
            "nodeSelector": {"pool": "gpu"},
            "platforms": ["linux/arm64"],
            "pullSecret": "registry-logins",
        }
    },
)


def test_no_images_no_prefetch(render: Render) -> None:
    assert not any(
        kind == "DaemonSet" and name == "p2p-prefetch" for kind, name in render(REQUIRED).ids()
    )


def test_the_prefetch_runs_the_agent_cli_on_the_selected_nodes(render: Render) -> None:
    rendered = render(PREFETCH)
    spec = rendered.pod_spec("DaemonSet", "p2p-prefetch")
    agent = rendered.pod_spec("DaemonSet", "p2p-agent")
    assert spec["hostNetwork"] is True  # the agent listens on the node's 127.0.0.1
    assert spec["nodeSelector"] == {**agent["nodeSelector"], "pool": "gpu"}
    assert spec["tolerations"] == agent["tolerations"]
    (init,) = spec["initContainers"]
    assert init["command"] == ["p2p-agent", "prefetch"]
    args = init["args"]
    assert args[:2] == ["--url", "http://127.0.0.1:5004"]
    assert args[-2:] == IMAGES
    assert args[args.index("--platform") + 1] == "linux/arm64"
    assert args[args.index("--docker-config") + 1] == "/etc/p2p/prefetch-auth/config.json"
    (volume,) = spec["volumes"]
    assert volume["secret"] == {
        "secretName": "registry-logins",
        "items": [{"key": ".dockerconfigjson", "path": "config.json"}],
    }
    (mount,) = init["volumeMounts"]
    assert mount["mountPath"] == "/etc/p2p/prefetch-auth"
    assert init["image"] == agent["containers"][0]["image"]
    assert init["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_rendered_arguments_parse_with_the_real_cli(render: Render) -> None:
    """The init container's arguments are ones ``p2p-agent prefetch`` accepts: with no agent
    and no wait it ends with 'no agent answers', not with a usage error."""
    (init,) = render(PREFETCH).pod_spec("DaemonSet", "p2p-prefetch")["initContainers"]
    args = [a for a in init["args"] if a != "/etc/p2p/prefetch-auth/config.json"]
    args.remove("--docker-config")
    args[args.index("--wait") + 1] = "0"
    args[args.index("--url") + 1] = "http://127.0.0.1:9"
    assert prefetch_main(args) == 1


def test_a_new_image_list_rolls_the_prefetch_and_nothing_else(render: Render) -> None:
    before = render(PREFETCH)
    after = render(merged(PREFETCH, {"prefetch": {"images": [*IMAGES, "team/extra:2"]}}))
    key = "p2p/prefetch-sha256"
    template = "spec", "template", "metadata", "annotations"

    def annotation(rendered: object, kind: str, name: str) -> object:
        node = rendered.get(kind, name)  # type: ignore[attr-defined]
        for part in template:
            node = node[part]
        return node

    assert (
        annotation(before, "DaemonSet", "p2p-prefetch")[key]
        != annotation(after, "DaemonSet", "p2p-prefetch")[key]
    )
    assert annotation(before, "DaemonSet", "p2p-agent") == annotation(
        after, "DaemonSet", "p2p-agent"
    )


def test_the_prefetch_follows_an_ipv6_loopback(render: Render) -> None:
    values = merged(PREFETCH, {"agent": {"loopback": "::1"}})
    (init,) = render(values).pod_spec("DaemonSet", "p2p-prefetch")["initContainers"]
    assert init["args"][:2] == ["--url", "http://[::1]:5004"]
