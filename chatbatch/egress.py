"""Where callbacks may go: public internet addresses, and what the operator allows.

A callback URL is chosen by whoever holds a key, and the workers that send callbacks run
inside the cluster, beside Redis, the model store and the cloud's metadata service. So a URL
whose host is, or resolves to, a loopback, private, link-local, cloud-metadata, multicast or
otherwise non-public address is refused: by producers when it is named (one line, or a 400
naming the URL), and by workers again before each attempt, after resolving the name afresh;
the attempt then connects to the address that was checked (never resolving again, so a name
that changes its answer between the check and the connection, DNS rebinding, gains nothing)
and follows no redirect.

`CHATBATCH_CALLBACK_ALLOW` (comma-separated host names, addresses or CIDR networks, e.g.
`127.0.0.1,hooks.internal,10.20.0.0/16`) lets chosen destinations through, for local
development, tests and receivers inside the network. A host name in it allows whatever that
name resolves to.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

import httpx

from chatbatch.exceptions import RefusedDestination, UnresolvedDestination

Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
#: Resolves (host, port) to the addresses a connection could go to.
Resolver: TypeAlias = Callable[[str, int], list[Address]]

#: Cloud instance metadata and platform endpoints (most are also link-local, private or
#: reserved; named here so that a refusal says what they are, and so that those with a public
#: address, Azure's wire server, are refused too).
METADATA: frozenset[Address] = frozenset(
    ipaddress.ip_address(address)
    for address in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, ...
        "169.254.170.2",  # AWS ECS task metadata
        "fd00:ec2::254",  # AWS over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud
        "168.63.129.16",  # Azure wire server
    )
)
#: NAT64 prefixes: the IPv4 address is the last 32 bits.
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


@dataclass(frozen=True)
class Allowed:
    """Destinations let through whatever their address (`CHATBATCH_CALLBACK_ALLOW`)."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[Network, ...] = ()

    @classmethod
    def parse(cls, value: str) -> Allowed:
        """From "host,address,network/bits,...".

        Raises:
            ValueError: an entry that is neither a host name nor an address or network.
        """
        hosts: set[str] = set()
        networks: list[Network] = []
        for entry in (part.strip() for part in value.split(",")):
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            name = entry.lower().rstrip(".")
            if not name or any(ch in name for ch in "/:@ ") or name.startswith("*"):
                raise ValueError(f"CHATBATCH_CALLBACK_ALLOW: {entry!r} is not a host name, an address or a CIDR network")
            hosts.add(name)
        return cls(frozenset(hosts), tuple(networks))

    def covers(self, address: Address) -> bool:
        return any(address.version == network.version and address in network for network in self.networks)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped, 6to4, Teredo's client, NAT64), which is
    where a connection to it ends up."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if any(address in prefix for prefix in _NAT64):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def refusal(address: Address) -> str | None:
    """Why callbacks may not go to this address ("loopback", "private", "link-local", "cloud
    metadata", "multicast" or "reserved"), or None for a public one."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = _embedded_ipv4(address)
        if inner is not None:
            return refusal(inner)
    if address in METADATA:
        return "cloud metadata"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local or (isinstance(address, ipaddress.IPv6Address) and address.is_site_local):
        # fec0::/10, site-local (deprecated, still routed inside some networks), is private.
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if address.is_private:
        return "private"
    if not address.is_global or address.is_reserved or address.is_unspecified:
        return "reserved"
    return None


def resolve(host: str, port: int) -> list[Address]:
    """Every address the system resolver gives for a host (a literal address: itself), in its
    order, without repeats; empty when the name does not resolve."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError):
        return []
    addresses: list[Address] = []
    for *_, sockaddr in found:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


@dataclass(frozen=True)
class Destination:
    """Where a callback goes: its URL, and the checked addresses to connect to."""

    url: httpx.URL
    addresses: tuple[Address, ...]

    def target(self, address: Address) -> httpx.URL:
        """The URL with its host replaced by `address` (the `Host` header and TLS server name
        keep the original host)."""
        return self.url.copy_with(host=str(address))

    @property
    def host_header(self) -> str:
        return self.url.netloc.decode("ascii")


def _literal(host: str) -> Address | None:
    """The address a URL's host spells in standard form, else None (a name, or another
    spelling, such as `2130706433`, that the resolver turns into an address)."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def check(url: str, allowed: Allowed, *, option: str = "callback_url", resolver: Resolver = resolve) -> Destination:
    """Resolve a callback URL's host and check every address it gives.

    Raises:
        RefusedDestination: naming the URL; the reason is given for a literal address only (for
            a name, saying which kind of address it resolves to would answer DNS questions
            about the network for whoever asks). UnresolvedDestination when the host does not
            resolve.
    """
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as error:
        raise RefusedDestination(f"{option} {url[:200]!r} is not a valid URL: {error}") from None
    host = parsed.host.lower().rstrip(".")
    if parsed.scheme not in ("http", "https") or not host:
        raise RefusedDestination(f"{option} {url[:200]!r} must be an http:// or https:// URL with a host")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    literal = _literal(host)
    addresses = [literal] if literal is not None else resolver(host, port)
    if not addresses:
        raise UnresolvedDestination(f"{option} {url[:200]!r}: its host does not resolve; callbacks need a host that does")
    if host in allowed.hosts:
        return Destination(parsed, tuple(addresses))
    for address in addresses:
        reason = None if allowed.covers(address) else refusal(address)
        if reason is None:
            continue
        what = f"is a {reason} address" if literal is not None else "resolves to an address that is not public"
        raise RefusedDestination(
            f"{option} {url[:200]!r} {what}: callbacks go to public internet addresses only "
            "(an operator may allow chosen hosts or networks with CHATBATCH_CALLBACK_ALLOW)"
        )
    return Destination(parsed, tuple(addresses))
