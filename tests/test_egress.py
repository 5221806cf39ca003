"""Where callbacks may go (chatbatch/egress.py): the address check as a pure function, and
the send that connects to the checked address only. Nothing here sends anything anywhere but
loopback: other addresses are checked, never contacted."""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from chatbatch.egress import Address, Allowed, check, refusal
from chatbatch.exceptions import RefusedDestination, UnresolvedDestination
from chatbatch.settings import Settings
from worker.service.callbacks import post


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        ("169.254.169.254", "cloud metadata"),
        ("169.254.170.2", "cloud metadata"),
        ("fd00:ec2::254", "cloud metadata"),
        ("100.100.100.200", "cloud metadata"),
        ("192.0.0.192", "cloud metadata"),
        ("168.63.129.16", "cloud metadata"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("fec0::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "private"),
        ("100.64.0.1", "reserved"),  # carrier-grade NAT
        ("192.0.2.10", "private"),  # documentation
        ("240.0.0.1", "private"),
        ("255.255.255.255", "private"),
        # IPv6 forms that end at an IPv4 address: mapped, NAT64, 6to4.
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.0.0.1", "private"),
        ("64:ff9b::a9fe:a9fe", "cloud metadata"),
        ("2002:7f00:1::", "loopback"),
        ("2002:c0a8:101::", "private"),
    ],
)
def test_non_public_addresses_are_refused_by_kind(address: str, kind: str) -> None:
    assert refusal(ipaddress.ip_address(address)) == kind


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "2001:4860:4860::8888"])
def test_public_addresses_pass(address: str) -> None:
    assert refusal(ipaddress.ip_address(address)) is None


def _resolver(table: dict[str, list[str]]):  # type: ignore[no-untyped-def]
    """A resolver answering from `table` (names only; nothing is looked up)."""

    def resolve(host: str, port: int) -> list[Address]:
        return [ipaddress.ip_address(address) for address in table.get(host, [])]

    return resolve


def test_every_address_a_name_resolves_to_is_checked_and_a_refusal_names_the_url() -> None:
    names = _resolver({"hooks.example": ["93.184.216.34"], "mixed.example": ["93.184.216.34", "10.0.0.7"], "meta.example": ["169.254.169.254"]})
    destination = check("https://hooks.example/cb?x=1", Allowed(), resolver=names)
    assert [str(a) for a in destination.addresses] == ["93.184.216.34"] and destination.host_header == "hooks.example"
    assert str(destination.target(destination.addresses[0])) == "https://93.184.216.34/cb?x=1"
    for url in ("https://mixed.example/cb", "http://meta.example:8080/latest/meta-data"):
        with pytest.raises(RefusedDestination) as refused:
            check(url, Allowed(), option="X-Chatbatch-Callback-Url", resolver=names)
        message = str(refused.value)
        assert url in message and "X-Chatbatch-Callback-Url" in message and "CHATBATCH_CALLBACK_ALLOW" in message
        # Which kind of address a name resolves to is not told (a DNS oracle for whoever asks).
        assert "private" not in message and "metadata" not in message and "10.0.0.7" not in message
    with pytest.raises(RefusedDestination, match="is a private address"):
        check("http://10.0.0.5/hook", Allowed(), resolver=names)
    with pytest.raises(UnresolvedDestination, match="does not resolve"):
        check("https://nowhere.example/hook", Allowed(), resolver=names)
    with pytest.raises(RefusedDestination, match="http"):
        check("ftp://hooks.example/x", Allowed(), resolver=names)


@pytest.mark.parametrize("url", ["http://127.0.0.1:6379/", "http://localhost:8080/", "http://2130706433/", "http://0x7f000001/", "http://[::1]/", "http://127.1/"])
def test_loopback_in_any_spelling_is_refused_by_the_system_resolver(url: str) -> None:
    """The system's own resolver turns these spellings into addresses (no network needed):
    each is checked as the address a connection would go to."""
    with pytest.raises(RefusedDestination):
        check(url, Allowed())


def test_the_allow_list_lets_chosen_hosts_addresses_and_networks_through() -> None:
    names = _resolver({"hooks.internal": ["10.9.8.7"], "other.internal": ["10.9.8.8"], "db.internal": ["10.20.1.5"]})
    allowed = Allowed.parse(" 127.0.0.1, hooks.internal., 10.20.0.0/16 ,")
    assert check("http://127.0.0.1:9/x", allowed).addresses == (ipaddress.ip_address("127.0.0.1"),)
    assert check("http://HOOKS.internal/x", allowed, resolver=names).addresses == (ipaddress.ip_address("10.9.8.7"),)
    assert check("http://db.internal/x", allowed, resolver=names)
    with pytest.raises(RefusedDestination):
        check("http://other.internal/x", allowed, resolver=names)
    with pytest.raises(RefusedDestination):
        check("http://[::1]:9/x", allowed)  # 127.0.0.1 allows that address only
    for bad in ("http://x/", "*.example", "a b"):
        with pytest.raises(ValueError, match="CHATBATCH_CALLBACK_ALLOW"):
            Allowed.parse(bad)
    with pytest.raises(ValueError, match="CHATBATCH_CALLBACK_ALLOW"):
        Settings(redis_url="redis://127.0.0.1:1/0", callback_allow="http://x/")


def test_a_name_that_changes_its_answer_is_checked_again_at_send() -> None:
    """DNS rebinding: the name resolved to a public address when the request named it, and to
    loopback when the worker checks it before sending; the send-time check refuses it."""
    answers = iter([["93.184.216.34"], ["127.0.0.1"]])

    def rebinding(host: str, port: int) -> list[Address]:
        return [ipaddress.ip_address(a) for a in next(answers)]

    check("http://rebind.example/hook", Allowed(), resolver=rebinding)  # the producer's check
    with pytest.raises(RefusedDestination):
        check("http://rebind.example/hook", Allowed(), resolver=rebinding)  # the worker's


class _Receivers:
    """Two loopback receivers: `first` redirects every POST to `second`."""

    def __init__(self) -> None:
        self.calls: dict[str, list[dict[str, str]]] = {"first": [], "second": []}
        self.servers: list[ThreadingHTTPServer] = []

    def start(self, name: str, redirect_to: int | None) -> int:
        calls = self.calls[name]

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers["Content-Length"]))
                calls.append(dict(self.headers.items()))
                if redirect_to is None:
                    self.send_response(200)
                else:
                    self.send_response(307)
                    self.send_header("Location", f"http://127.0.0.1:{redirect_to}/elsewhere")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.servers.append(server)
        return int(server.server_address[1])


@pytest.fixture
def receivers() -> Iterator[_Receivers]:
    state = _Receivers()
    yield state
    for server in state.servers:
        server.shutdown()


def test_a_send_goes_to_the_checked_address_with_the_urls_host_and_follows_no_redirect(receivers: _Receivers) -> None:
    """The name resolves (here, by the test's table) to loopback, allowed: the POST reaches
    that address carrying the URL's own host, is never resolved again (the name exists
    nowhere else), and the receiver's redirect is not followed."""
    second = receivers.start("second", None)
    first = receivers.start("first", second)
    names = _resolver({"hooks.example": ["127.0.0.1"]})
    destination = check(f"http://hooks.example:{first}/hook", Allowed.parse("127.0.0.1"), resolver=names)
    assert post(destination, b"{}", {"Content-Type": "application/json"}, timeout=10) == "HTTP 307"
    assert [call["Host"] for call in receivers.calls["first"]] == [f"hooks.example:{first}"]
    assert receivers.calls["second"] == []
