"""The TLS context of the agent's HTTP client, built in a thread while the agent starts.

Loading the CA bundle is the largest single cost of a cold start after the
imports (20 to 50 ms, docs/performance.md "Where cold start goes"), and
OpenSSL spends it without holding the GIL. So :func:`start_building` begins it
before the agent imports its session rooms and the HTTP stack, and
:class:`compozy_agent.http.ProviderClient` is given the finished context.

The context is the one httpx builds by default (``verify=True`` with the
environment trusted): the bundle ``SSL_CERT_FILE`` names, else the directory
``SSL_CERT_DIR`` names, else certifi's bundle.
"""

from __future__ import annotations

import os
import ssl
import threading
from collections.abc import Callable


def default_context() -> ssl.SSLContext:
    """httpx's default context (httpx._config.create_ssl_context with verify=True)."""
    cafile = os.environ.get("SSL_CERT_FILE")
    if cafile:
        return ssl.create_default_context(cafile=cafile)
    capath = os.environ.get("SSL_CERT_DIR")
    if capath:
        return ssl.create_default_context(capath=capath)
    import certifi

    return ssl.create_default_context(cafile=certifi.where())


def start_building() -> Callable[[], ssl.SSLContext]:
    """Start building :func:`default_context` in a thread; the returned function waits
    for it and returns it, or raises what building it raised."""
    built: list[ssl.SSLContext] = []
    failed: list[BaseException] = []

    def build() -> None:
        try:
            built.append(default_context())
        except BaseException as exc:  # handed to the caller, who decides
            failed.append(exc)

    thread = threading.Thread(target=build, name="compozy-agent tls", daemon=True)
    thread.start()

    def result() -> ssl.SSLContext:
        thread.join()
        if failed:
            raise failed[0]
        return built[0]

    return result
