"""OutboundHttp: the one aiohttp session of a process, and the guards every request passes.

Started by the runtime (worker or scheduler role) and closed on shutdown, never at import.

SSRF: a destination is checked at the address the socket will connect to. A name is resolved
once by GuardedResolver, which drops forbidden addresses and hands aiohttp only the checked ones
(so there is no second lookup an attacker's DNS could answer differently); a literal address,
which aiohttp does not resolve, is checked before the request; and the socket factory checks the
final address again as a last line. Redirects are followed only when asked, by hand, each hop
checked like the first.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import aiohttp
import structlog
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from app.src.api.http.gate import HostGate
from app.src.api.http.signing import SigningSecrets, no_signing_secrets
from app.src.api.models.http import (
    MAX_REDIRECTS,
    MAX_RESULT_BODY_BYTES,
    AddressPolicy,
    IPAddress,
    literal_address,
    unlookable_name,
)
from app.src.api.models.http import destination as destination
from app.src.utils.json_text import storable_text

if TYPE_CHECKING:
    from app.database import Database
    from app.settings import Settings

log = structlog.get_logger("taskgate.http")

USER_AGENT = "Taskgate"
DNS_CACHE_TTL_S = 10  # aiohttp caches what the guarded resolver returned: checked addresses only
REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Not carried to another origin by a redirect (as browsers and requests do).
CREDENTIAL_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})

Signer = Callable[[bytes], Mapping[str, str]]  # body -> signature headers (fresh per hop)


class ForbiddenDestination(OSError):
    """The destination resolves to, or is, an address outbound requests may not reach."""


class LookupBusy(OSError):
    """Every name lookup thread of this process is taken (by lookups a DNS server leaves
    unanswered): nothing was sent, and the destination did not fail."""


class LookupThreads:
    """getaddrinfo and getnameinfo on threads of their own, for aiohttp's ThreadedResolver (in
    place of its event loop's): a lookup that finds no free thread is refused at once (LookupBusy).

    On the loop's default executor (a handful of threads), lookups that a tenant's DNS server
    never answers held every thread (until the system resolver gave up, long after their connect
    timeouts), and every other name's lookup queued behind them inside its connect timeout: a
    healthy host timed out unsent and was recorded as failing (an attempt spent, its circuit
    opened)."""

    def __init__(self, threads: int) -> None:
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="taskgate-dns")
        self._free = threads
        self._lock = threading.Lock()

    async def getaddrinfo(
        self, host: Any, port: Any, *, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
    ) -> Any:
        return await self._run(functools.partial(socket.getaddrinfo, host, port, family, type, proto, flags))

    async def getnameinfo(self, sockaddr: Any, flags: int = 0) -> Any:
        return await self._run(functools.partial(socket.getnameinfo, sockaddr, flags))

    async def _run(self, lookup: Callable[[], Any]) -> Any:
        with self._lock:
            if self._free == 0:
                raise LookupBusy("every name lookup thread of this process is waiting for a DNS answer")
            self._free -= 1

        def run() -> Any:
            try:
                return lookup()
            finally:  # when the lookup ends, not when its caller stopped waiting
                with self._lock:
                    self._free += 1

        return await asyncio.get_running_loop().run_in_executor(self._executor, run)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class RedirectError(Exception):
    """Too many redirects, or a Location that is not a URL."""


@dataclass(frozen=True, slots=True)
class NextHop:
    """The request a redirect to another destination asks for: it needs that host's permit, so
    OutboundHttp.send hands it back instead of sending it (delivery.exchange sends it)."""

    method: str
    url: str
    headers: dict[str, str]
    body: bytes | None
    redirects: int  # redirects followed to get here, this one included


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    reason: str  # reason and headers: storable text (json_text.storable_text)
    headers: dict[str, str]
    body: bytes  # the first MAX_RESULT_BODY_BYTES
    url: str  # after the redirects that were followed
    duration_ms: float
    next_hop: NextHop | None = None  # a redirect to another destination, to follow there


class GuardedResolver(AbstractResolver):
    """Resolve a name once, keep only the addresses the policy allows, refuse if none is left."""

    def __init__(self, policy: AddressPolicy, inner: AbstractResolver | None = None) -> None:
        self.policy = policy
        self._inner = inner or aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        allowed: list[ResolveResult] = []
        refused: list[str] = []
        for entry in await self._inner.resolve(host, port, family):
            address = literal_address(entry["host"])
            reason = "not an IP address" if address is None else self.policy.refusal(address)
            if reason is None:
                allowed.append(entry)
            else:
                refused.append(reason)
        if not allowed:
            raise ForbiddenDestination(f"destination refused: {host} resolves to {'; '.join(refused)}")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


def forbidden_reason(found: BaseException) -> str | None:
    """The refusal inside an aiohttp connection error, if that is what it was."""
    inner = within(found, ForbiddenDestination)
    return None if inner is None else str(inner)


def within(found: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The `kind` exception an aiohttp connection error carries (as cause, context or os_error)."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [found]
    while stack:
        exc = stack.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        if isinstance(exc, kind):
            return exc
        stack += [exc.__cause__, exc.__context__, getattr(exc, "os_error", None)]
    return None


class OutboundHttp:
    """Process-wide outbound HTTP: pooled session, address guard, signer source, host gate."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        *,
        signing_secrets: SigningSecrets = no_signing_secrets,
        payload_context: Mapping[str, Any] | None = None,
    ) -> None:
        self.db = db
        self.policy = AddressPolicy(tuple(settings.HTTP_ALLOWED_NETWORKS))
        self.signing_secrets = signing_secrets
        self.payload_context = payload_context
        self.connect_timeout_s = settings.HTTP_CONNECT_TIMEOUT_S
        self.max_connections = settings.HTTP_MAX_CONNECTIONS
        self.gate = HostGate(
            db,
            limit=settings.HTTP_HOST_MAX_CONCURRENCY,
            wait_s=settings.HTTP_HOST_PERMIT_WAIT_S,
            circuit_failures=settings.HTTP_CIRCUIT_FAILURES,
            cooldown_s=settings.HTTP_CIRCUIT_COOLDOWN_S,
        )
        # The process's HTTP_MAX_CONNECTIONS, taken before a request (take_connection) instead of
        # by aiohttp's connector, whose wait for a free connection counts in the connect timeout:
        # a request to a healthy host that waited behind slow ones timed out unsent, and was
        # recorded as its host failing.
        self._connections = asyncio.Semaphore(self.max_connections)
        self._session: aiohttp.ClientSession | None = None
        self._lookups: LookupThreads | None = None

    async def start(self) -> None:
        # a lookup per request in flight (a refused one is deferred, see LookupThreads)
        self._lookups = LookupThreads(self.max_connections)
        resolver = aiohttp.ThreadedResolver(loop=cast(asyncio.AbstractEventLoop, self._lookups))
        connector = aiohttp.TCPConnector(
            limit=0,  # no limit of its own: take_connection is the pool's limit
            resolver=GuardedResolver(self.policy, resolver),
            ttl_dns_cache=DNS_CACHE_TTL_S,
            socket_factory=self._connect_socket,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            # explicit everywhere: aiohttp's default is a 300 s total
            timeout=aiohttp.ClientTimeout(total=30, connect=self.connect_timeout_s),
            cookie_jar=aiohttp.DummyCookieJar(),  # one session serves every tenant: never keep cookies
            trust_env=False,  # no proxy from the environment: the address guard must see the target
            headers={"User-Agent": USER_AGENT},
        )

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._lookups is not None:
            self._lookups.close()
            self._lookups = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("OutboundHttp.start() has not run (it runs in the serving lifecycle)")
        return self._session

    async def take_connection(self, wait_s: float) -> bool:
        """One of the process's HTTP_MAX_CONNECTIONS requests in flight, waited for at most
        `wait_s`; False when none came (give_connection() gives a taken one back)."""
        try:
            async with asyncio.timeout(max(wait_s, 0.001)):
                await self._connections.acquire()
        except TimeoutError:
            return False
        return True

    def give_connection(self) -> None:
        self._connections.release()

    def check_address(self, url: URL) -> None:
        """Refuse a literal forbidden address (aiohttp connects to literals without resolving)."""
        if url.scheme not in ("http", "https") or not url.host:
            raise ForbiddenDestination(f"not an http(s) URL with a host: {url}")
        address = literal_address(url.host)
        if address is not None:
            reason = self.policy.refusal(address)
            if reason is not None:
                raise ForbiddenDestination(f"destination refused: {reason}")

    def _connect_socket(self, addr_info: Any) -> socket.socket:
        family, type_, proto, _, sockaddr = addr_info
        address: IPAddress | None = literal_address(str(sockaddr[0]))
        reason = "not an IP address" if address is None else self.policy.refusal(address)
        if reason is not None:
            raise ForbiddenDestination(f"destination refused: {reason}")
        return socket.socket(family=family, type=type_, proto=proto)

    async def send(
        self,
        *,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | None,
        timeout_s: float,
        follow_redirects: bool,
        signer: Signer | None = None,
        redirects_left: int = MAX_REDIRECTS,
    ) -> HttpResponse:
        """One request (and its redirects when asked) within `timeout_s` overall.

        Redirects within the destination (host:port) are followed here, under its permit; one to
        another destination comes back as the response's `next_hop`, for the caller to send
        under that destination's permit (HTTP_HOST_MAX_CONCURRENCY holds for it too).

        Raises ForbiddenDestination, RedirectError, TimeoutError or aiohttp.ClientError.
        """
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        deadline = loop.time() + timeout_s
        current = URL(url, encoded=True)
        sent_headers = dict(headers)
        for hop in range(MAX_REDIRECTS + 1):
            self.check_address(current)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"timed out after {timeout_s} s")
            request_headers = {**sent_headers, **(signer(body or b"") if signer else {})}
            async with self.session.request(
                method,
                current,
                headers=request_headers,
                data=body,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(
                    total=remaining, connect=min(self.connect_timeout_s, remaining)
                ),
            ) as response:
                next_hop = None
                location = response.headers.get("Location")
                if follow_redirects and response.status in REDIRECTS and location:
                    if hop >= redirects_left:
                        raise RedirectError(f"more than {MAX_REDIRECTS} redirects")
                    target = join_location(current, location)
                    if response.status == 303 or (response.status in (301, 302) and method == "POST"):
                        method, body = ("HEAD" if method == "HEAD" else "GET"), None
                        sent_headers = {k: v for k, v in sent_headers.items() if k.lower() != "content-type"}
                    if target.origin() != current.origin():
                        sent_headers = {
                            k: v for k, v in sent_headers.items() if k.lower() not in CREDENTIAL_HEADERS
                        }
                    if destination(target) == destination(current):
                        current = target
                        continue
                    next_hop = NextHop(method, str(target), sent_headers, body, redirects=hop + 1)
                content = b"" if next_hop else await _read_capped(response, MAX_RESULT_BODY_BYTES)
                return HttpResponse(
                    status=response.status,
                    reason=storable_text(response.reason or ""),
                    headers=_flatten(response.headers),
                    body=content,
                    url=str(current),
                    duration_ms=(time.perf_counter() - started) * 1000,
                    next_hop=next_hop,
                )
        raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover


def join_location(base: URL, location: str) -> URL:
    """The absolute http(s) URL a Location header names, relative to `base`; RedirectError when it
    names none (not a URL, or one without a host such as `mailto:`: nothing could ever fetch it)."""
    try:
        target = base.join(URL(location))
    except ValueError:
        raise RedirectError(f"the Location header is not a URL: {location[:200]!r}") from None
    if target.scheme not in ("http", "https") or not target.host:
        raise RedirectError(f"the Location header is not an http(s) URL with a host: {location[:200]!r}")
    unlookable = unlookable_name(target.host)
    if unlookable is not None:
        raise RedirectError(f"the Location header names no reachable host: {unlookable}")
    return target


async def _read_capped(response: aiohttp.ClientResponse, cap: int) -> bytes:
    """At most `cap` bytes of the body; the rest is never read (the connection is then closed
    instead of pooled, which aiohttp does for a response released before its end)."""
    content = bytearray()
    while len(content) < cap:
        chunk = await response.content.read(cap - len(content))
        if not chunk:
            break
        content += chunk
    return bytes(content)


def _flatten(headers: Mapping[str, str]) -> dict[str, str]:
    """One value per name, as text that can be stored: aiohttp decodes header bytes that are not
    UTF-8 (a Latin-1 filename, say) to lone surrogates, which PostgreSQL refuses."""
    flat: dict[str, str] = {}
    for raw_name, raw_value in headers.items():
        name, value = storable_text(raw_name), storable_text(raw_value)
        flat[name] = f"{flat[name]}, {value}" if name in flat else value
    return flat
