"""Which ``Host`` headers the API answers: the guard against DNS rebinding.

A web page on ``evil.example`` can make its own name resolve to 127.0.0.1 and then read, from
the visitor's browser, anything a server on the visitor's machine answers, as if it were its
own origin; the only trace is the ``Host: evil.example`` header. The API therefore answers only
the host names it is known by:

- ``ALPHAWATCH_ALLOWED_HOSTS`` when set (a comma list; ``*`` answers any host);
- else, when alphawatch itself binds the server (``alphawatch up`` / ``serve``), the bound host
  and ``localhost``, ``127.0.0.1``, ``[::1]``; a server bound to every interface (``0.0.0.0``,
  ``::``) also answers any IP address (a page cannot rebind an address, only a name);
- an app built without a bound host (a test client, the app mounted in one's own ASGI server)
  checks only when the setting is given.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

LOOPBACK = ("localhost", "127.0.0.1", "::1")
EVERY_INTERFACE = frozenset({"0.0.0.0", "::", ""})
SETTING = "ALPHAWATCH_ALLOWED_HOSTS"


def host_of(header: str) -> str | None:
    """The host of a ``Host`` header (no port, no brackets, lower case), or None when it is no
    host (``[::1`` , ``a b``, a port that is not a number)."""
    header = header.strip().lower()
    if header.startswith("["):
        inside, bracket, rest = header[1:].partition("]")
        if not bracket or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        return inside if _is_ip(inside) else None
    name, colon, port = header.partition(":")
    if colon and not port.isdigit():
        return None
    name = name.removesuffix(".")
    if not name or any(not (c.isalnum() or c in "-._") for c in name):
        return None
    return name


def normalised(entry: str) -> str:
    """An entry of the setting as :func:`host_of` reads headers: ``[::1]`` is ``::1``."""
    entry = entry.strip().lower()
    if entry.startswith("[") and entry.endswith("]"):
        entry = entry[1:-1]
    return entry.removesuffix(".")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class AllowedHosts:
    """The host names answered, and whether any IP address is too."""

    names: frozenset[str]
    any_address: bool = False

    def allows(self, header: str | None) -> bool:
        """Whether a request with this ``Host`` header is answered (none: refused)."""
        host = host_of(header) if header is not None else None
        if host is None:
            return False
        return host in self.names or (self.any_address and _is_ip(host))

    def describe(self) -> str:
        """The rule, as a refusal states it."""
        shown = ", ".join(f"[{n}]" if ":" in n else n for n in sorted(self.names))
        return shown + (" and any IP address" if self.any_address else "")


def allowed_hosts(setting: list[str], bound_host: str | None) -> AllowedHosts | None:
    """The hosts answered, from the setting and the host the server binds; None: any."""
    if "*" in setting:
        return None
    if setting:
        return AllowedHosts(frozenset(normalised(h) for h in setting))
    if bound_host is None:
        return None
    bound = normalised(bound_host)
    if bound in EVERY_INTERFACE:
        return AllowedHosts(frozenset(LOOPBACK), any_address=True)
    return AllowedHosts(frozenset({*LOOPBACK, bound}))
