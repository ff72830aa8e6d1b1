"""The origin registry client: manifests and blobs from one registry, with its own auth.

``client`` (:class:`OriginClient`), ``auth`` (challenges and tokens), ``responses`` (the
result types and the mapping of origin answers to registry errors). Besides manifests and blobs,
the client gets tag lists and referrers (:meth:`OriginClient.get_listing`), never cached.

A trio + httpx shell over :mod:`p2p_common.oci` and :mod:`p2p_common.registry_auth`.
:class:`OriginClient` talks only to the registry it was made for, to the token realm that
registry names in its ``Bearer`` challenge (http or https only), and, for blob downloads,
to where the registry redirects them (registries with object storage do; the redirect is
followed without credentials and never from https down to http).

Auth (:mod:`~p2p_proxy.origin.auth`): anonymous first, then the registry's own challenge
(Basic or the Docker token flow) with the caller's :class:`Credentials`; tokens cached in
memory. Credentials and tokens are never logged and never written anywhere.

Every failure is an :class:`~p2p_common.oci.OCIError` a service can answer with:
401 from the origin for these credentials -> ``UNAUTHORIZED``; authenticated but not
allowed -> ``DENIED``; 404 -> ``MANIFEST_UNKNOWN``/``BLOB_UNKNOWN``/``NAME_UNKNOWN``;
429 -> ``TOOMANYREQUESTS``; unreachable, 5xx or nonsense -> ``UNKNOWN`` 502 (504 on a
timeout). Callers own time: wrap calls in trio cancel scopes; the connect and read
timeouts here are only safety nets against a silent origin.
"""

from p2p_common.registry_auth import Credentials
from p2p_proxy.origin.client import OriginClient
from p2p_proxy.origin.responses import (
    MAX_MANIFEST_BYTES,
    BlobConsumer,
    BlobHead,
    ListingResponse,
    ManifestResponse,
)

__all__ = [
    "MAX_MANIFEST_BYTES",
    "BlobConsumer",
    "BlobHead",
    "Credentials",
    "ListingResponse",
    "ManifestResponse",
    "OriginClient",
]
