"""`docker-credential-compozy`: a container registry credential helper.

Docker, podman, skopeo and buildah run ``docker-credential-<name> ACTION`` for
a registry that the config's ``credHelpers`` (or ``credsStore``) maps to
``<name>``, per docker/docker-credential-helpers: the request on stdin, the
answer (or an error text) on stdout, exit 1 on error.

* ``get`` (stdin: the registry's server URL): ``{"ServerURL", "Username",
  "Secret"}`` with the fixed USERNAME and an access token valid at least
  MIN_VALID seconds (builds and pushes hold it; gcloud's helper keeps the same
  minimum). Never ``<token>`` as the username: Docker would take the secret for
  an identity (refresh) token and keep it; the agent's refresh token never
  leaves the agent anyway. When this helper is the default store
  (``credsStore``) and the registry is not one of its ``credHelpers``, it holds
  nothing for it: the not-found answer, exactly NOT_FOUND, so the client goes
  on without credentials (anonymous pulls from other registries keep working).
* ``store``: answers success and stores nothing (``docker login`` would
  otherwise put a password in a file; the agent is the store).
* ``erase`` (``docker logout``, or a client whose token was refused): tells the
  agent the current token was rejected (the ``rejected_token`` path), so the
  next ``get`` is a new token; it never logs the session out.
* ``list``: the registries the Docker config maps to this helper.
* ``version``: the package version.

The profile and audience come from the config's ``rules:`` matched by the
registry's ``host[:port]`` (:mod:`compozy_client.rules`), else
``$COMPOZY_PROFILE`` or ``default``. Never interactive: a session that needs a
login is one line naming the ``compozy login`` to run (on stdout, which the
client shows, and stderr), exit 1.
The common case (``get``) costs what ``compozy auth token``'s fast path costs
(:mod:`compozy_client.helpertoken`).
"""

from __future__ import annotations

import os
import sys

USERNAME = "compozy"
#: Seconds the token handed to ``get`` stays valid at least.
MIN_VALID = 55 * 60.0
#: docker-credential-helpers' errCredentialsNotFoundMessage: clients match this text.
NOT_FOUND = "credentials not found in native keychain"
#: docker-credential-helpers' errCredentialsMissingServerURLMessage.
MISSING_SERVER_URL = "no credentials server URL"
#: The name in credHelpers / credsStore (the command is docker-credential-<name>).
HELPER_NAME = "compozy"
_MAX_INPUT = 64 * 1024

_USAGE = "usage: docker-credential-compozy get|store|erase|list|version"


def main() -> None:
    """Entry point of the ``docker-credential-compozy`` command."""
    try:
        code = run(sys.argv[1:])
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def run(args: list[str]) -> int:
    """Do ``args[0]``, reading its request from stdin; the exit code."""
    action = args[0] if len(args) == 1 else ""
    if action == "get":
        return _get(_read_stdin())
    if action == "store":
        _read_stdin()  # the client waits for us to read it; nothing is kept
        return 0
    if action == "erase":
        return _erase(_read_stdin())
    if action == "list":
        return _list()
    if action == "version":
        from compozy_client import __version__

        _out(f"docker-credential-compozy (compozy-agent) {__version__}")
        return 0
    os.write(2, (_USAGE + "\n").encode())
    return 1


def _read_stdin() -> str:
    data = b""
    while len(data) <= _MAX_INPUT:
        chunk = os.read(0, 65536)
        if not chunk:
            break
        data += chunk
    return data[:_MAX_INPUT].decode(errors="replace").strip()


def _out(text: str) -> None:
    os.write(1, (text + "\n").encode())


def _fail(line: str) -> int:
    """An error as the credential-helper protocol carries it: the text on stdout
    (clients show it), the same line on stderr for a person running it by hand."""
    _out(line)
    os.write(2, (line + "\n").encode())
    return 1


def registry_host(server_url: str) -> str:
    """``host[:port]`` of a server URL as clients pass it (``https://h/v1/``, ``h:5000``)."""
    rest = server_url.strip()
    scheme, sep, after = rest.partition("://")
    if sep and scheme.isalpha():
        rest = after
    return rest.split("/", 1)[0].lower()


def _get(server_url: str) -> int:
    from compozy_client import helpertoken

    if not server_url:
        return _fail(MISSING_SERVER_URL)
    if not _serves(registry_host(server_url)):
        _out(NOT_FOUND)
        return 1
    answer = helpertoken.get(None, min_valid=MIN_VALID, host=registry_host(server_url))
    if isinstance(answer, helpertoken.Refusal):
        return _fail(answer.line())
    _out('{"ServerURL":' + _json_string(server_url) + ',"Username":"' + USERNAME
         + '","Secret":' + _json_string(answer.token) + "}")
    return 0


def _erase(server_url: str) -> int:
    from compozy_client import helpertoken

    if not server_url:
        return _fail(MISSING_SERVER_URL)
    if not _serves(registry_host(server_url)):
        return 0  # nothing held for it
    host = registry_host(server_url)
    current = helpertoken.get(None, host=host)
    if isinstance(current, helpertoken.Refusal):
        if current.needs_login:
            return 0  # no token to drop; the next get says to log in
        return _fail(current.line())
    if current.expires_at is None:
        return 0  # an API key: nothing the agent can replace
    rejected = helpertoken.get(None, rejected_token=current.token, host=host)
    if isinstance(rejected, helpertoken.Refusal):
        return _fail(rejected.line())
    return 0


def _list() -> int:
    import json

    helpers, _store = _docker_config()
    hosts = sorted(host for host, name in helpers.items() if name == HELPER_NAME)
    _out(json.dumps(dict.fromkeys(hosts, USERNAME)))
    return 0


def _serves(host: str) -> bool:
    """Whether this helper answers for ``host``: always, unless it is only the default
    store (``credsStore``) and ``host`` is not one of its ``credHelpers``."""
    path = docker_config_path()
    try:
        with open(path, "rb") as file:
            text = file.read(1024 * 1024)
    except OSError:
        return True
    if b'"credsStore"' not in text:
        return True  # reached through credHelpers: the client chose us for this host
    helpers, store = _docker_config()
    if store != HELPER_NAME:
        return True
    return any(registry_host(name) == host and value == HELPER_NAME
               for name, value in helpers.items())


def docker_config_path() -> str:
    """Where Docker reads its config: ``$DOCKER_CONFIG/config.json`` or ~/.docker's."""
    directory = os.environ.get("DOCKER_CONFIG") or os.path.join(
        os.path.expanduser("~"), ".docker")
    return os.path.join(directory, "config.json")


def _docker_config() -> tuple[dict[str, str], str]:
    """The config's ``credHelpers`` and ``credsStore`` (empty when unreadable)."""
    import json

    try:
        with open(docker_config_path(), "rb") as file:
            document = json.loads(file.read(1024 * 1024))
    except (OSError, ValueError, RecursionError):
        return {}, ""
    if not isinstance(document, dict):
        return {}, ""
    helpers = document.get("credHelpers")
    store = document.get("credsStore")
    helpers = {str(k): str(v) for k, v in helpers.items()} if isinstance(helpers, dict) else {}
    return helpers, store if isinstance(store, str) else ""


def _json_string(value: str) -> str:
    if '"' in value or "\\" in value or not value.isprintable() or not value.isascii():
        import json

        return json.dumps(value)
    return f'"{value}"'


if __name__ == "__main__":
    main()
