"""The listening socket, taken before the model loads, and the addresses a person can open.

Binding first means a port that is taken, or a host that is not this machine's, is reported at
once instead of after minutes of loading the 3B model; the socket is then handed to uvicorn.
"""

from __future__ import annotations

import errno
import socket

ALL_INTERFACES = ("0.0.0.0", "::", "")
# Any routable address: connecting a UDP socket sends nothing, it only picks the interface
# this machine would use to reach the outside, whose address is the one LAN clients use.
_ROUTE_PROBE = ("10.255.255.255", 1)


class ListenError(Exception):
    """The server cannot listen where it was asked to; the message is one line."""


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, as asyncio names it when it binds a port itself: asyncio switches Nagle's
    # algorithm off (TCP_NODELAY) only on connections accepted from a socket whose protocol says
    # TCP. With protocol 0 every response after the first on a kept-alive connection (the openai
    # SDK, requests.Session, browsers) waited for the client's delayed acknowledgement: 40 ms more
    # to the first token on Linux.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    # As uvicorn does: a restarted server may take the port while old connections linger.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except socket.gaierror as error:
        sock.close()
        raise ListenError(
            f"--host {host}: not an address of this machine ({error.strerror}); "
            f"use 0.0.0.0 for every interface or 127.0.0.1 for this machine only"
        ) from error
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise ListenError(
                f"port {port} is already in use on {host or '0.0.0.0'} (another server, or an earlier "
                f"api.py still running?); stop it or pass --port / PORT"
            ) from error
        if error.errno == errno.EACCES:
            raise ListenError(
                f"port {port}: permission denied (ports below 1024 need root); pass --port with a port from 1024 up"
            ) from error
        if error.errno == errno.EADDRNOTAVAIL:
            raise ListenError(
                f"--host {host}: not an address of this machine; use 0.0.0.0 for every interface "
                f"or 127.0.0.1 for this machine only"
            ) from error
        raise ListenError(f"cannot listen on {host}:{port}: {error.strerror}") from error
    return sock


def url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def lan_address() -> str | None:
    """This machine's address on its network, or None when it has no route out."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(_ROUTE_PROBE)
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def where_to_open(host: str, port: int) -> list[str]:
    """Lines for the start-up log: a URL to click or paste first, then how others reach it."""
    if host not in ALL_INTERFACES:
        return [f"open {url(host, port)} (Press CTRL+C to quit)"]
    local = url("::1" if host == "::" else "127.0.0.1", port)
    lines = [f"open {local} on this machine (Press CTRL+C to quit)"]
    address = lan_address()
    if address:
        lines.append(f"listening on all interfaces: other machines on the network use {url(address, port)}")
    else:
        lines.append(f"listening on all interfaces: other machines use this machine's address, port {port}")
    if port == 6006:
        lines.append("on AutoDL, open the address shown under 自定义服务 (custom service): it maps port 6006")
    return lines
