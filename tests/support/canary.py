"""The canary check: no token the test provider issued may show up where it must not.

The test provider reports every secret that crosses its endpoints (codes,
PKCE verifiers, access, refresh and ID tokens, device codes); each is a
distinct random value, so each is its own canary. After every integration
test that used an agent environment, :func:`check_environment` searches for
all of them, from every provider of the run so far:

* every file under the environment's root (the agent's log, the state file,
  the audit log, the config), except the opt-in plaintext secret store
  ``secrets.json``, whose whole purpose is to hold refresh tokens;
* the log of every agent the test started in the foreground;
* what the CLI wrote to stderr (any message or exception text), and to stdout
  except for `compozy auth token`, whose output is a token by design;
* the argv and environment of every process on the machine.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable
from pathlib import Path

#: The opt-in plaintext store (``storage: file``): holding refresh tokens is its job.
ALLOWED_FILES = frozenset({"secrets.json"})

_lock = threading.Lock()
_issued: set[str] = set()


def remember(secrets: Iterable[object]) -> None:
    """Record secrets the provider saw or issued (called from the provider's reader)."""
    with _lock:
        _issued.update(s for s in secrets if isinstance(s, str) and len(s) >= 16)


def issued() -> frozenset[str]:
    with _lock:
        return frozenset(_issued)


def _process_texts() -> list[tuple[str, str]]:
    texts = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            for name in ("cmdline", "environ"):
                with contextlib.suppress(OSError):
                    texts.append((f"/proc/{entry.name}/{name}",
                                  (entry / name).read_bytes().decode(errors="replace")))
    return texts


def find_leaks(root: Path, outputs: Iterable[tuple[str, str]]) -> list[str]:
    """Where a canary appears: ``"<place>: <first 6 characters>…"`` for each hit."""
    canaries = issued()
    if not canaries:
        return []
    places: list[tuple[str, str]] = list(outputs)
    if root.exists():
        for path in root.rglob("*"):
            if path.is_file() and not path.is_socket() and path.name not in ALLOWED_FILES:
                with contextlib.suppress(OSError):
                    places.append((str(path), path.read_bytes().decode(errors="replace")))
    places.extend(_process_texts())
    hits = []
    for place, text in places:
        for canary in canaries:
            if canary in text:
                hits.append(f"{place}: {canary[:6]}…")
    return hits
