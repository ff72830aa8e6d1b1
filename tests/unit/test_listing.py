"""p2p_common.listing: the query parameters of tag lists and referrers, RFC 8288 Link headers,
and the next-page link rewritten for the service passing a listing on."""

from __future__ import annotations

import urllib.parse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2p_common.listing import (
    MAX_LINK_LENGTH,
    listing_params,
    next_link,
    parse_link_header,
)
from p2p_common.oci import OCIError

DIGEST = "sha256:" + "ab" * 32
TAGS = "/v2/team/app/tags/list"
REFERRERS = f"/v2/team/app/referrers/{DIGEST}"


def test_listing_params_keep_order_drop_ns_and_check_the_known_ones() -> None:
    query = {"ns": ["registry.example.com"], "n": ["50"], "last": ["v1.2"], "cursor": ["x/y=="]}
    assert listing_params("tags", query) == [("n", "50"), ("last", "v1.2"), ("cursor", "x/y==")]
    assert listing_params("referrers", {"artifactType": ["application/vnd.dev.cosign+json"]}) == [
        ("artifactType", "application/vnd.dev.cosign+json")
    ]
    assert listing_params("tags", {}) == []


@pytest.mark.parametrize(
    ("kind", "query"),
    [
        ("tags", {"n": ["-1"]}),
        ("tags", {"n": ["ten"]}),
        ("tags", {"n": ["1000001"]}),
        ("tags", {"last": ["x" * 257]}),
        ("tags", {"last": ["a\nb"]}),
        ("tags", {"artifactType": ["application/json"]}),  # only for referrers
        ("referrers", {"artifactType": ["not a media type"]}),
        ("referrers", {"bad name!": ["1"]}),
        ("tags", {f"p{i}": ["1"] for i in range(17)}),
        ("tags", {"cursor": ["x" * 1025]}),
    ],
)
def test_bad_listing_params_are_400(kind: str, query: dict[str, list[str]]) -> None:
    with pytest.raises(OCIError) as refused:
        listing_params(kind, query)  # type: ignore[arg-type]
    assert refused.value.status == 400


def test_link_headers_as_rfc_8288_writes_them() -> None:
    links = parse_link_header(
        [
            '</v2/a/tags/list?n=2&last=b>; rel="next", '
            '<https://x.example/p>; rel=prev; title="a, b"',
            '<https://x.example/q>; REL="Next Last"; anchor="#\\"q\\""',
        ]
    )
    assert [link.target for link in links] == [
        "/v2/a/tags/list?n=2&last=b",
        "https://x.example/p",
        "https://x.example/q",
    ]
    assert links[0].rels == {"next"}
    assert links[1].params == {"rel": "prev", "title": "a, b"}
    assert links[2].rels == {"next", "last"}
    assert links[2].params["anchor"] == '#"q"'
    assert parse_link_header([]) == []
    assert parse_link_header([" , "]) == []


@pytest.mark.parametrize(
    "value",
    [
        "/v2/a; rel=next",  # no <>
        "<unterminated; rel=next",
        '<a>; rel="unterminated',
        "<a>; =x",
        "<a> junk",
        "<a b>; rel=next",
        "<a>; rel=@",
        "<a>," * 17,
        "<" + "a" * MAX_LINK_LENGTH + ">",
    ],
)
def test_malformed_link_headers_are_refused(value: str) -> None:
    with pytest.raises(ValueError):
        parse_link_header([value])


targets = st.builds(
    "{}?{}".format,
    st.sampled_from(["/v2/team/app/tags/list", "https://r.example/v2/team/app/tags/list", ""]),
    st.lists(
        st.tuples(st.from_regex(r"[a-z_]{1,8}", fullmatch=True), st.text(min_size=0, max_size=20)),
        max_size=4,
    ).map(lambda pairs: urllib.parse.urlencode(pairs, quote_via=urllib.parse.quote)),
)
params = st.dictionaries(
    st.from_regex(r"[a-z]{1,8}", fullmatch=True),
    st.one_of(
        st.from_regex(r"[A-Za-z0-9_.\-]{0,10}", fullmatch=True),
        st.text(st.characters(codec="ascii", exclude_categories=("Cc",)), max_size=10),
    ),
    max_size=3,
)


def render_link(target: str, link_params: dict[str, str]) -> str:
    out = f"<{target}>"
    for name, value in link_params.items():
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        out += f'; {name}="{escaped}"'
    return out


@settings(max_examples=300)
@given(st.lists(st.tuples(targets, params), max_size=5))
def test_what_a_writer_renders_parses_back(links: list[tuple[str, dict[str, str]]]) -> None:
    parsed = parse_link_header([", ".join(render_link(t, p) for t, p in links)])
    assert [(link.target, link.params) for link in parsed] == links


@settings(max_examples=500)
@given(st.lists(st.text(max_size=60), max_size=3))
def test_any_text_parses_or_raises_value_error(values: list[str]) -> None:
    try:
        parsed = parse_link_header(values)
    except ValueError:
        return
    for link in parsed:
        assert "<" not in link.target
        assert ">" not in link.target


# --- the next-page link, for this service ------------------------------------------------------


@pytest.mark.parametrize(
    ("upstream", "ns", "expected"),
    [
        # The proxy's link (relative, with the proxy's ns) for a mirror-mode client.
        (
            '</v2/team/app/tags/list?n=2&last=b&ns=r.example>; rel="next"',
            "r.example",
            '</v2/team/app/tags/list?n=2&last=b&ns=r.example>; rel="next"',
        ),
        # The same for a rewrite-mode client: no ns.
        (
            '</v2/team/app/tags/list?n=2&last=b&ns=r.example>; rel="next"',
            None,
            '</v2/team/app/tags/list?n=2&last=b>; rel="next"',
        ),
        # An origin's absolute link: the client comes back here, not to the origin.
        (
            '<https://r.example/v2/team/app/tags/list?last=b&n=2>; rel="next"',
            "r.example",
            '</v2/team/app/tags/list?last=b&n=2&ns=r.example>; rel="next"',
        ),
        # An opaque cursor and a value that needs quoting, among other links.
        (
            '<https://r.example/v2/team/app/tags/list?next_page=a%2Fb%3D%3D>; rel="next", '
            '<https://r.example/docs>; rel="help"',
            None,
            '</v2/team/app/tags/list?next_page=a%2Fb%3D%3D>; rel="next"',
        ),
        # A link with only a query.
        ('<?last=z>; rel="next"', None, '</v2/team/app/tags/list?last=z>; rel="next"'),
    ],
)
def test_next_link_for_tags(upstream: str, ns: str | None, expected: str) -> None:
    assert next_link([upstream], TAGS, ns) == expected


def test_next_link_for_referrers_keeps_the_filter_and_a_percent_encoded_path() -> None:
    encoded = f"/v2/team/app/referrers/{DIGEST.replace(':', '%3A')}"
    upstream = f'<{encoded}?artifactType=application%2Fvnd.example%2Bjson&page=2>; rel="next"'
    assert next_link([upstream], REFERRERS, None) == (
        f'<{REFERRERS}?artifactType=application%2Fvnd.example%2Bjson&page=2>; rel="next"'
    )


@pytest.mark.parametrize(
    "upstream",
    [
        [],
        ['</v2/team/app/tags/list?last=b>; rel="prev"'],  # no next
        ['</v2/other/tags/list?last=b>; rel="next"'],  # another repository
        ['</v2/x/team/app/tags/list?last=b>; rel="next"'],  # another repository, same ending
        ['</v2/team/app/tags/list?n=abc>; rel="next"'],  # parameters we would refuse
        ["garbage"],
    ],
)
def test_no_usable_next_link(upstream: list[str]) -> None:
    assert next_link(upstream, TAGS, "r.example") is None
