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
  except for `compozy auth token` and `compozy auth dpop-proof`, whose output
  is a token by design;
* the argv and environment of every process on the machine.

DPoP private keys (RFC 9449) are canaries too, everywhere, the token-printing
commands' stdout included: where a test can read the secret store (``storage:
file``), each session's own key in every form a leak could take
(:func:`remember_dpop_keys`: the PKCS #8 text, the private scalar as a JWK
``d``, in hex); and in logs, CLI output and processes (not files, where a test
may keep a TLS stand-in's key), any private key in PKCS #8 form (what the
agent's secret store holds: its DER prefix is the same for every P-256 or
Ed25519 key) or PEM.
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
from collections.abc import Iterable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

#: The opt-in plaintext store (``storage: file``): holding refresh tokens is its job.
ALLOWED_FILES = frozenset({"secrets.json"})

#: Outputs whose place starts so may hold tokens (they print one by design), never a key.
TOKEN_OUTPUT = "token output of "
#: What every private key in the agent's secret-store form starts with: PKCS #8 DER of a
#: P-256 key and of an Ed25519 key, in base64 (the same in base64url: no + or /), and PEM.
KEY_MARKERS = ("MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg", "MC4CAQAwBQYDK2VwBCIEI",
               "PRIVATE KEY-----")

_lock = threading.Lock()
_issued: set[str] = set()
_keys: set[str] = set()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def remember_dpop_keys(secrets_file: Path) -> list[str]:
    """Record each DPoP key of an opt-in plaintext store (``secrets.json``) in every
    form a leak could take; returns the PKCS #8 texts."""
    try:
        entries = json.loads(secrets_file.read_text())
    except (OSError, ValueError):
        return []
    found = []
    for name, value in entries.items():
        if not name.endswith(":dpop_key"):
            continue
        pkcs8 = json.loads(value)["pkcs8"]
        der = base64.urlsafe_b64decode(pkcs8 + "=" * (-len(pkcs8) % 4))
        key = serialization.load_der_private_key(der, password=None)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            raw = key.private_numbers().private_value.to_bytes(32, "big")
        else:
            assert isinstance(key, ed25519.Ed25519PrivateKey)
            raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                    serialization.NoEncryption())
        forms = {value, pkcs8, base64.b64encode(der).decode(), _b64url(raw), raw.hex()}
        with _lock:
            _keys.update(forms)
        found.append(pkcs8)
    return found


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
    if not canaries and not _keys:
        return []
    places: list[tuple[str, str]] = list(outputs)
    if root.exists():
        for path in root.rglob("*"):
            if path.is_file() and not path.is_socket() and path.name not in ALLOWED_FILES:
                with contextlib.suppress(OSError):
                    places.append((str(path), path.read_bytes().decode(errors="replace")))
    places.extend(_process_texts())
    with _lock:
        session_keys = list(_keys)
    files = {str(path) for path in root.rglob("*")} if root.exists() else set()
    hits = []
    for place, text in places:
        tokens_allowed = place.startswith(TOKEN_OUTPUT)
        for canary in () if tokens_allowed else canaries:
            if canary in text:
                hits.append(f"{place}: {canary[:6]}…")
        # Files may be a test's own keys (a TLS stand-in's): only session keys count there.
        keys = session_keys if place in files else [*session_keys, *KEY_MARKERS]
        for key in keys:
            if key in text:
                hits.append(f"{place}: DPoP private key material {key[:6]}…")
    return hits
