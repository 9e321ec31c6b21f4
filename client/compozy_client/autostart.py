"""Starting an agent for a caller that found none: isolated, and once per process.

Both ways to `compozy auth token` use it: the stdlib-only fast path
(:mod:`compozy_client.fasttoken`), which starts the agent itself so that a cold
start does not wait for the full CLI to load first, and
:func:`compozy_client.connection.connect`. An agent this process already
started for a socket is not started again: the full CLI, taking over from the
fast path, waits for the one already on its way.

Standard library only, and no ``typing`` at run time (the fast path imports it).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping

from compozy_client.agentpaths import absolute_path_variables

TYPE_CHECKING = False
if TYPE_CHECKING:
    import _socket
    from collections.abc import Callable

#: How long a caller waits for an agent it started to answer (seconds).
AUTOSTART_TIMEOUT = 10.0
#: Set to "0" to keep the CLI from starting an agent by itself.
AUTOSTART_ENV = "COMPOZY_AGENT_AUTOSTART"

#: Socket path -> when (``time.monotonic()``) this process started an agent for it.
_started: dict[str, float] = {}


def autostart_allowed() -> bool:
    return os.environ.get(AUTOSTART_ENV, "1").strip().lower() not in ("0", "false", "no")


def start_once(path: str) -> float:
    """Start an agent for ``path`` unless this process did within AUTOSTART_TIMEOUT;
    returns when the (first) one was started, on ``time.monotonic()``."""
    path = os.path.abspath(path)
    now = time.monotonic()
    started = _started.get(path)
    if started is not None and now - started < AUTOSTART_TIMEOUT:
        return started
    start_agent(path)
    _started[path] = now
    return now


def connect_once_started(
    path: str, deadline: float, connect: Callable[[str, float], _socket.socket | None],
) -> _socket.socket | None:
    """For the token fast path, which found no agent on ``path``: start one (once, if
    allowed) and return ``connect(path, deadline)``'s socket once it answers; None when
    none answered by AUTOSTART_TIMEOUT or ``deadline``. ``OSError`` from ``connect``
    (other than nothing listening) goes to the caller.

    The full CLI, if it must take over, waits for this agent instead of starting
    another (:func:`start_once`).
    """
    if not autostart_allowed():
        return None
    started_by = min(start_once(path) + AUTOSTART_TIMEOUT, deadline)
    delay = 0.005
    while time.monotonic() < started_by:
        time.sleep(delay)
        # A failed connect costs microseconds; a coarse poll would add up to its
        # interval to every cold start (bench/cold_start.py).
        delay = min(delay * 2, 0.02)
        sock = connect(path, deadline)
        if sock is not None:
            return sock
    return None


def start_agent(path: str) -> None:
    """Spawn a detached agent serving ``path``; its log goes to the agent's log file.

    The agent holds every refresh token, so it starts isolated from its caller:

    * ``-P``: the caller's working directory is not put on ``sys.path`` (by
      default ``python -m`` puts it first, so an ``anyio.py`` in a cloned
      repository would run inside the agent). Not ``-I``: that also implies
      ``-s``, which drops the user site-packages where ``pip install --user``
      puts the agent, and ``-E``, which drops the ``PYTHONPATH`` an install
      may rely on; the environment is curated here instead.
    * ``cwd="/"``, so no relative path resolves into the caller's directory
      (the agent also moves to ``/`` by itself).
    * an environment built from :func:`agent_environment`'s allowlist, so the
      agent never holds ``FLYZT_API_KEY``, cloud credentials or anything else
      the first caller happened to have.
    """
    argv = [sys.executable, "-P", "-m", "compozy_agent", "--autostarted"]
    env = agent_environment(os.environ, os.path.abspath(path))
    if "threading" not in sys.modules and sys.platform != "darwin":
        # The CLI's fast path: one thread, so fork is safe (not on macOS, where a
        # fork without exec may break system libraries), and importing subprocess
        # would delay every cold start by several ms (bench/cold_start.py).
        _fork_exec(argv, env)
        return
    import subprocess

    subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd="/",
        env=env,
        start_new_session=True,
        close_fds=True,
    )


def _fork_exec(argv: list[str], env: dict[str, str]) -> None:
    """What ``subprocess.Popen`` does above, by hand, in a process with one thread:
    a new session, ``/`` as working directory, /dev/null as stdin, stdout and
    stderr, no other descriptor, ``argv`` run with ``env``. Nothing is waited for."""
    if os.fork() != 0:
        return
    try:
        os.setsid()
        os.chdir("/")
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        try:
            highest = max(int(name) for name in os.listdir("/proc/self/fd"))
        except (OSError, ValueError):
            highest = 1023
        os.closerange(3, highest + 1)
        os.execve(argv[0], argv, env)  # noqa: S606  (our interpreter, our arguments)
    finally:
        os._exit(127)  # only if exec failed: the caller waits for an agent in vain and says so


#: Variables an autostarted agent keeps, by exact name. docs/security.md lists
#: them with the reason for each; everything else is left behind.
AGENT_ENV_NAMES = frozenset({
    # who and where the user is (platformdirs, the config path, getpass)
    "HOME", "USER", "LOGNAME", "PATH", "TMPDIR",
    # the keyring: the D-Bus session bus (Secret Service, KWallet), the backend
    # chosen by hand, macOS's keychain file
    "DBUS_SESSION_BUS_ADDRESS", "PYTHON_KEYRING_BACKEND", "KEYCHAIN_PATH",
    # locale and time zone of log lines and messages
    "LANG", "LANGUAGE", "TZ",
    # the provider's HTTPS: proxies (httpx reads both cases) and CA bundles
    "http_proxy", "https_proxy", "all_proxy", "no_proxy",
    "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE",
    # how the caller's interpreter found this installation and its shared
    # libraries (the search paths: absolute entries only, see agent_environment)
    "PYTHONPATH", "PYTHONHOME", "PYTHONUSERBASE", "PYTHONNOUSERSITE", "LD_LIBRARY_PATH",
})
#: Search paths among them, where an empty or relative entry means the working directory.
SEARCH_PATH_VARIABLES = ("PYTHONPATH", "LD_LIBRARY_PATH")
#: Variables an autostarted agent keeps, by prefix: the agent's own settings,
#: the XDG base and runtime directories, locale categories, keyring properties.
AGENT_ENV_PREFIXES = ("COMPOZY_", "XDG_", "LC_", "KEYRING_PROPERTY_")


def agent_environment(environ: Mapping[str, str], socket: str) -> dict[str, str]:
    """The environment of an agent started for a caller whose environment is ``environ``.

    Only allowlisted variables pass. Paths the caller gave relative to its
    working directory are made absolute, so the agent (working in ``/``) uses
    the same files; search paths (``PYTHONPATH``, ``LD_LIBRARY_PATH``) keep
    only absolute entries, since a relative or empty one means "the working
    directory".
    """
    env = {
        name: value for name, value in environ.items()
        if name in AGENT_ENV_NAMES or name.startswith(AGENT_ENV_PREFIXES)
    }
    for name in SEARCH_PATH_VARIABLES:
        entries = [entry for entry in env.pop(name, "").split(os.pathsep) if os.path.isabs(entry)]
        if entries:
            env[name] = os.pathsep.join(entries)
    absolute_path_variables(env)
    env["COMPOZY_AGENT_SOCK"] = socket
    return env
