"""Who holds a TCP port on this machine: before a token goes over plain http to loopback.

Plain http to 127.0.0.1 has no certificate to tell whose server answers, and
any user may bind a port the person's own server (a development server, an
``ssh -L``, a ``kubectl port-forward``) is not holding right now. The git
credential helper and the httpx/requests adapters ask this module first.
Standard library only (the git helper's light path imports it).
"""

from __future__ import annotations

import os


def foreign_listener(port: int) -> int | None:
    """The uid of a process of another user (not root) listening on ``port`` of a
    loopback or wildcard address, or None.

    Plain http to this machine has no certificate to tell whose server answers: when
    the person's own server (a development server, an ``ssh -L`` or ``kubectl
    port-forward``) is not running, any user may bind its port. The kernel's socket
    tables say who holds it (Linux; elsewhere, and where ``/proc`` is hidden, None:
    not checked). root is accepted (``docker-proxy`` publishes containers' ports).
    """
    import struct

    me = os.getuid()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as lines:
                next(lines, None)  # the header
                for line in lines:
                    # sl local_address rem_address st queues timer retrnsmt uid ...
                    fields = line.split()
                    if len(fields) < 8 or fields[3] != "0A":  # 0A: TCP_LISTEN
                        continue
                    address, _, port_hex = fields[1].partition(":")
                    if int(port_hex, 16) != port:
                        continue
                    # The address's 32-bit words are printed in host byte order.
                    raw = bytes.fromhex(address)
                    words = struct.unpack(f"={len(raw) // 4}I", raw)
                    owner = int(fields[7])
                    if _reaches_loopback(struct.pack(f"!{len(words)}I", *words)) \
                            and owner not in (me, 0):
                        return owner
        except (OSError, ValueError, struct.error):
            continue
    return None


def _reaches_loopback(address: bytes) -> bool:
    """Whether a listener on ``address`` (4 or 16 bytes, network order) takes connections
    to 127.0.0.1 or ::1: a loopback address, the wildcard, or their v4-mapped forms."""
    if len(address) == 16 and address[:12] == bytes(10) + b"\xff\xff":
        address = address[12:]
    if len(address) == 4:
        return address[0] == 127 or address == bytes(4)
    return address in (bytes(16), bytes(15) + b"\x01")
