"""`compozy auth kube-token`: kubectl's exec credential plugin.

kubectl (client-go) runs the command named in the kubeconfig's ``users[].user.exec``
whenever it has no unexpired credential, reads an ``ExecCredential`` from its
stdout and caches the token until ``status.expirationTimestamp`` (client-go
``plugin/pkg/client/auth/exec``; it runs the plugin again after a 401). It
passes ``KUBERNETES_EXEC_INFO``, an ``ExecCredential`` naming the apiVersion it
wants and whether the plugin may use the terminal (``spec.interactive``).

What this plugin does about both:

* the profile and audience are ``--profile``/``--audience``, else the config's
  ``rules:`` matched by the cluster's server URL (passed when the exec entry
  has ``provideClusterInfo: true``, as setup-kube writes it) or the audience,
  else ``$COMPOZY_PROFILE`` or ``default``;
* it answers in the apiVersion asked for, ``client.authentication.k8s.io/v1``
  or ``v1beta1`` (v1 when run by hand), and refuses any other with one line;
* it never starts a login, opens a browser or reads stdin, whatever
  ``interactive`` says: a session that needs one is one line on stderr naming
  the ``compozy login`` to run, and exit 1, at once. (kubelogin opening
  browser tabs from background kubectl calls is the complaint this avoids.)
* the token it hands out stays valid at least MIN_VALID seconds, and the
  expiry it reports is up to EXPIRY_MARGIN earlier than the real one, so a
  request kubectl starts just before the reported expiry still carries a
  valid token (kubelogin's lack of a margin is the other complaint).

The common case imports what ``compozy auth token``'s fast path does
(:mod:`compozy_client.helpertoken`): no argparse, no json unless the
environment's ExecCredential is not in the compact form kubectl writes.
"""

from __future__ import annotations

import os
import time

from compozy_client import helpertoken

API_V1 = "client.authentication.k8s.io/v1"
API_V1BETA1 = "client.authentication.k8s.io/v1beta1"
#: kubectl caches the token until the reported expiry: at least this long.
MIN_VALID = 300.0
#: The reported expiry is this much before the real one (half the token's life at most).
EXPIRY_MARGIN = 60.0

_VALUE_FLAGS = ("--profile", "--audience")


class ExecInfo:
    """What kubectl asked for in ``KUBERNETES_EXEC_INFO`` (``raw``: the whole value)."""

    __slots__ = ("api_version", "interactive", "raw")

    def __init__(self, api_version: str, interactive: bool, raw: str = "") -> None:
        self.api_version = api_version
        self.interactive = interactive
        self.raw = raw

    def cluster_server(self) -> str | None:
        """The cluster's server URL, when kubectl passes it (``provideClusterInfo``)."""
        import json

        try:
            server = json.loads(self.raw)["spec"]["cluster"]["server"]
        except (ValueError, KeyError, TypeError, RecursionError):
            return None
        return server if isinstance(server, str) else None


def run(args: list[str]) -> int | None:
    """Print an ExecCredential and return 0, or 1 after one line on stderr; None when the
    arguments need the full CLI's parser (``--help``, an unknown flag)."""
    options: dict[str, str] = {}
    index = 0
    while index < len(args):
        name, eq, inline = args[index].partition("=")
        if name not in _VALUE_FLAGS:
            return None
        if eq:
            value = inline
        elif index + 1 < len(args):
            index += 1
            value = args[index]
        else:
            return None
        options[name[2:]] = value
        index += 1
    return emit(options.get("profile"), options.get("audience"))


def emit(profile: str | None, audience: str | None) -> int:
    """The plugin's work once its options are known: print, or say why not."""
    info = exec_info(os.environ.get("KUBERNETES_EXEC_INFO", ""))
    if isinstance(info, str):
        os.write(2, (info + "\n").encode())
        return 1
    # Rules (compozy_client.rules) may pick the profile by the cluster's server URL.
    answer = helpertoken.get(profile, audience, min_valid=MIN_VALID, url=info.cluster_server)
    if isinstance(answer, helpertoken.Refusal):
        os.write(2, (answer.line() + "\n").encode())
        return 1
    os.write(1, exec_credential(info, answer.token, answer.expires_at, time.time()).encode())
    return 0


def exec_info(value: str) -> ExecInfo | str:
    """What ``KUBERNETES_EXEC_INFO`` asks for, or a message saying why it cannot be met."""
    if not value.strip():
        return ExecInfo(API_V1, False)  # run by hand, or a kubectl that sends nothing
    # kubectl writes it with Go's encoding/json: compact, fields in a fixed order.
    api_version: str | None = None
    for known in (API_V1, API_V1BETA1):
        if f'"apiVersion":"{known}"' in value:
            api_version = known
    interactive = '"interactive":true' in value
    if api_version is None or value.count('"apiVersion":') != 1 \
            or value.count('"interactive":') != 1:
        parsed = _exec_info_json(value)
        if isinstance(parsed, str):
            return parsed
        api_version, interactive = parsed
    if api_version not in (API_V1, API_V1BETA1):
        return (f"compozy: kubectl asked for an ExecCredential of apiVersion {api_version!r}; "
                f"compozy auth kube-token speaks {API_V1} and {API_V1BETA1}")
    return ExecInfo(api_version, interactive, value)


def _exec_info_json(value: str) -> tuple[str, bool] | str:
    import json

    try:
        document = json.loads(value)
        api_version = document.get("apiVersion")
        spec = document.get("spec") or {}
        interactive = spec.get("interactive", False)
    except (ValueError, AttributeError, RecursionError):
        return "compozy: KUBERNETES_EXEC_INFO is not a JSON ExecCredential"
    if not isinstance(api_version, str):
        return "compozy: KUBERNETES_EXEC_INFO names no apiVersion"
    return api_version, interactive is True


def reported_expiry(expires_at: float, now: float) -> float:
    """The expiry kubectl is told: EXPIRY_MARGIN early, or half the time left if less."""
    return expires_at - min(EXPIRY_MARGIN, max(0.0, expires_at - now) / 2)


def exec_credential(info: ExecInfo, token: str, expires_at: float | None, now: float) -> str:
    """The ExecCredential document kubectl reads, with a newline. An API key
    (``expires_at`` None) gets no expiry: kubectl keeps it until a 401."""
    status = [f'"token":{_json_string(token)}']
    if expires_at is not None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(reported_expiry(expires_at, now)))
        status.insert(0, f'"expirationTimestamp":"{stamp}"')
    interactive = "true" if info.interactive else "false"
    return ('{"kind":"ExecCredential","apiVersion":"' + info.api_version + '",'
            '"spec":{"interactive":' + interactive + '},'
            '"status":{' + ",".join(status) + "}}\n")


def _json_string(value: str) -> str:
    if '"' in value or "\\" in value or not value.isprintable() or not value.isascii():
        import json

        return json.dumps(value)
    return f'"{value}"'

