"""The contract of the built-in `http` kind: payload, result, waiting state, reachable addresses.

The address policy lives here because it is part of the contract: the payload model refuses
literal addresses it can never reach (422 at enqueue), and the adapter (app/src/api/http/)
applies the same policy to every address a name resolves to at run time.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AnyUrl,
    BaseModel,
    ConfigDict,
    Field,
    UrlConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)
from yarl import URL

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_TIMEOUT_S = 900.0
MAX_RESULT_BODY_BYTES = 64 * 1024
MAX_REDIRECTS = 5
# Validation context key (Runtime.payload_context): the HTTP_ALLOWED_NETWORKS of the deployment.
ALLOWED_NETWORKS_CONTEXT = "http_allowed_networks"

# Never reachable, whatever HTTP_ALLOWED_NETWORKS says: cloud metadata services hand out the
# machine's credentials (AWS/GCP/Azure/OCI 169.254.169.254 and AWS fd00:ec2::254, AWS ECS task
# metadata 169.254.170.2, Alibaba 100.100.100.200).
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "169.254.170.2", "100.100.100.200")
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _embedded_ipv4(address: IPAddress) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address carries (6to4, Teredo, NAT64): they can reach them too."""
    if not isinstance(address, ipaddress.IPv6Address):
        return []
    found: list[ipaddress.IPv4Address] = []
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        found.extend(address.teredo)
    if address in _NAT64:
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


def _non_public(address: IPAddress) -> str | None:
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
        return "site-local"  # fec0::/10: deprecated, still routed inside older networks
    if address.is_multicast:
        return "multicast"
    if address.is_private:
        return "private"
    if address.is_reserved:
        return "reserved"
    if not address.is_global:  # shared (CGNAT), documentation, benchmarking ranges and the like
        return "not publicly routable"
    return None


@dataclass(frozen=True, slots=True)
class AddressPolicy:
    """Which addresses outbound requests may reach: public ones, plus the `allowed` networks."""

    allowed: tuple[IPNetwork, ...] = ()

    def refusal(self, address: IPAddress) -> str | None:
        """Why `address` may not be reached, or None when it may."""
        if isinstance(address, ipaddress.IPv6Address):
            if address.scope_id:
                address = ipaddress.IPv6Address(int(address))
            if address.ipv4_mapped is not None:
                address = address.ipv4_mapped  # the socket reaches the IPv4 address itself
        candidates: list[IPAddress] = [address, *_embedded_ipv4(address)]
        for candidate in candidates:
            if candidate in METADATA_ADDRESSES:
                return f"{candidate} is a cloud metadata address"
        for candidate in candidates:
            reason = _non_public(candidate)
            if reason is not None and not any(candidate in network for network in self.allowed):
                carried = f" (carried in {address})" if candidate != address else ""
                return f"{candidate} is a {reason} address{carried}"
        return None

    @classmethod
    def from_context(cls, context: Mapping[str, Any] | None) -> AddressPolicy:
        return cls(tuple((context or {}).get(ALLOWED_NETWORKS_CONTEXT, ())))


def literal_address(host: str) -> IPAddress | None:
    """The IP address a URL host spells literally ([v6] brackets allowed), or None for a name."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def unlookable_name(host: str) -> str | None:
    """Why no name lookup can take `host` (an empty label, or one over 63 characters: the IDNA
    encoding getaddrinfo applies refuses them), or None. Literal addresses are never looked up."""
    if literal_address(host) is not None:
        return None
    try:
        host.encode("idna")
    except UnicodeError:
        return f"the host name {host[:100]!r} has an empty label or one longer than 63 characters"
    return None


# RFC 9110 field-name token; values must not smuggle a line break (header injection) or NUL.
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_FORBIDDEN_IN_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Set by Taskgate itself (framing, connection management, signatures): a client may not override.
RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "proxy-connection",
        "proxy-authorization",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
    }
)

TargetUrl = Annotated[
    AnyUrl,
    UrlConstraints(max_length=8192, allowed_schemes=["http", "https"], host_required=True),
]
Method = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
StatusCode = Annotated[int, Field(ge=100, le=599)]


class HttpPayload(BaseModel):
    """Call `url`, reliably: retried on network errors, timeouts, 408, 429 and 5xx.

    Send `body` (text) or `json`, not both. `success_codes` defaults to any 2xx. With
    `follow_async`, a 202 with a Location header makes the task wait while the scheduler polls
    that URL until `async_deadline_s` (the asynchronous request-reply pattern).
    """

    model_config = ConfigDict(extra="forbid", serialize_by_alias=True)

    url: TargetUrl
    method: Method = "POST"
    headers: dict[str, str] = Field(default_factory=dict, max_length=100)
    body: str | None = Field(default=None, max_length=1024 * 1024)
    json_body: Any = Field(default=None, alias="json", description="a JSON document to send as the body")
    timeout_s: float = Field(default=30.0, gt=0, le=MAX_TIMEOUT_S)
    success_codes: list[StatusCode] | None = Field(
        default=None, min_length=1, max_length=100, description="default: any 2xx"
    )
    follow_async: bool = False
    follow_redirects: bool = Field(default=False, description=f"at most {MAX_REDIRECTS} hops, each checked")
    async_deadline_s: float = Field(
        default=3600.0, gt=0, le=7 * 86_400, description="with follow_async: how long to poll for the result"
    )

    @field_validator("method", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("url")
    @classmethod
    def _reachable(cls, url: AnyUrl, info: ValidationInfo) -> AnyUrl:
        if url.username or url.password:
            raise ValueError("credentials in the URL are not accepted; send them in headers")
        unlookable = unlookable_name(url.host or "")
        if unlookable is not None:
            raise ValueError(unlookable)
        address = literal_address(url.host or "")
        if address is not None:
            # Only literal addresses can be judged here; names are resolved and checked per
            # request. The allowlist comes from the validation context (HTTP_ALLOWED_NETWORKS):
            # without it, only public addresses pass.
            reason = AddressPolicy.from_context(info.context).refusal(address)
            if reason is not None:
                raise ValueError(f"destination refused: {reason}")
        return url

    @field_validator("headers")
    @classmethod
    def _headers(cls, headers: dict[str, str]) -> dict[str, str]:
        seen: set[str] = set()
        for name, value in headers.items():
            lowered = name.lower()
            if not _TOKEN.match(name) or len(name) > 256:
                raise ValueError(f"header name {name!r} is not a valid HTTP field name")
            if lowered in RESERVED_HEADERS:
                raise ValueError(f"header {name!r} is set by Taskgate and cannot be given")
            if lowered in seen:
                raise ValueError(f"header {name!r} is given twice")
            if _FORBIDDEN_IN_VALUE.search(value) or len(value) > 8192:
                raise ValueError(f"header {name!r} has a value with a line break or control character")
            seen.add(lowered)
        return headers

    @model_validator(mode="after")
    def _one_body(self) -> HttpPayload:
        if self.body is not None and self.has_json:
            raise ValueError("give body or json, not both")
        return self

    @property
    def has_json(self) -> bool:
        return "json_body" in self.model_fields_set

    def succeeded(self, status: int) -> bool:
        return status in self.success_codes if self.success_codes else 200 <= status <= 299


class HttpResult(BaseModel):
    """The response that ended the task: status, headers, the first 64 KiB of the body."""

    status: int
    headers: dict[str, str]
    body: str
    duration_ms: float


class HttpWaitState(BaseModel):
    """What a waiting `http` task stores (in its `result`) while the scheduler polls its status."""

    status_url: str
    accepted_at: datetime
    deadline: datetime
    polls: int = 0
    last_error: str | None = None


def destination(url: str | URL) -> str:
    """The host key of permits, circuit, metrics and GET /api/hosts: host:port, lowercased, without
    a trailing dot (`example.com.` is the fully qualified `example.com`), the port always written
    (the scheme's default when the URL has none): every spelling of one destination shares its
    limit and circuit."""
    parsed = url if isinstance(url, URL) else URL(url)
    return f"{(parsed.host or '').lower().rstrip('.')}:{parsed.port}"
