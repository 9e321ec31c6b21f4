"""`compozy auth setup-docker`: make container tools get a registry's password from the agent.

Adds ``"credHelpers": {"HOST": "compozy"}`` to Docker's config
(``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``), which Docker,
podman, skopeo and buildah read: for that registry only they then run
``docker-credential-compozy get``. Everything else in the file is kept; the
file is replaced atomically (a temporary file in the same directory, fsync,
rename) with mode 0600, and a file that is not a JSON object is left alone
with an error. ``--unset`` removes the entry again.
"""

from __future__ import annotations

from compozy_client.commands.common import EXIT_OK, add_command
from compozy_client.commands.output import info, warn

# No typing import at run time: see compozy_client/__init__.py.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any


EXAMPLES = """examples:
  compozy auth setup-docker --registry registry.compozy.dev
  docker pull registry.compozy.dev/team/app:1.2     # password from the agent
  skopeo inspect docker://registry.compozy.dev/team/app:1.2
  compozy auth setup-docker --registry registry.compozy.dev --unset"""


def add_parser(subparsers: Any) -> None:
    parser = add_command(subparsers, "setup-docker",
                         "Make container tools use the agent for a registry", EXAMPLES)
    parser.add_argument("--registry", required=True, metavar="HOST",
                        help="the registry's host (and :port), as in image names")
    parser.add_argument("--unset", action="store_true", help="remove the entry again")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import shutil

    from compozy_client.dockercred import HELPER_NAME, docker_config_path, registry_host
    from compozy_client.errors import UsageError

    host = registry_host(args.registry)
    if not host or any(c.isspace() for c in host):
        raise UsageError(f"not a registry host: {args.registry!r} (e.g. registry.example.com "
                         "or 127.0.0.1:5000)")
    path = docker_config_path()
    document = _read(path)
    helpers = document.setdefault("credHelpers", {})
    if not isinstance(helpers, dict):
        raise UsageError(f"{path}: credHelpers is not an object; fix it by hand, nothing "
                         "was changed")
    if args.unset:
        if helpers.get(host) != HELPER_NAME:
            info(f"{host} does not use docker-credential-{HELPER_NAME} in {path}; "
                 "nothing changed")
            return EXIT_OK
        del helpers[host]
        if not helpers:
            del document["credHelpers"]
        write_atomically(path, document)
        info(f"{host} no longer uses docker-credential-{HELPER_NAME} ({path})")
        return EXIT_OK
    helpers[host] = HELPER_NAME
    write_atomically(path, document)
    info(f"{host} now gets its password from docker-credential-{HELPER_NAME} ({path})")
    if shutil.which(f"docker-credential-{HELPER_NAME}") is None:
        warn(f"docker-credential-{HELPER_NAME} is not on PATH: put the directory holding "
             "`compozy` on PATH, or the tools cannot run it")
    return EXIT_OK


def _read(path: str) -> dict[str, Any]:
    import json

    from compozy_client.errors import UsageError

    try:
        with open(path, "rb") as file:
            text = file.read()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise UsageError(f"cannot read {path} ({exc.strerror}); nothing was changed") from None
    if not text.strip():
        return {}
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):
        raise UsageError(f"{path} is not valid JSON; fix it by hand, nothing was "
                         "changed") from None
    if not isinstance(document, dict):
        raise UsageError(f"{path} is not a JSON object; fix it by hand, nothing was changed")
    return document


def write_atomically(path: str, document: dict[str, Any]) -> None:
    """Replace ``path`` with ``document`` (mode 0600): a reader sees the old file or the
    new one, never a part."""
    import contextlib
    import json
    import os
    import tempfile

    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    data = (json.dumps(document, indent="\t") + "\n").encode()
    descriptor, temporary = tempfile.mkstemp(prefix=".config.json.", dir=directory)
    try:
        os.fchmod(descriptor, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    try:  # the rename itself survives a crash once the directory is synced
        directory_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)
