"""`compozy-agent`: the composition root. Hardening, sockets, backend, signals.

Modes:

* ``compozy-agent``: run in the foreground, log to stderr.
* ``compozy-agent --daemon``: bind, then detach (like ``ssh-agent``) and log to
  the agent's log file; the parent exits once the socket answers.
* ``compozy-agent --sh | --csh | --fish``: print the lines that point a shell
  at the agent's socket, starting a detached agent when none answers.
* ``--autostarted`` (used by the CLI): like ``--daemon`` but already detached
  by the CLI; losing the start-up race to another agent is not an error.
* Started by systemd socket activation (``LISTEN_FDS``) or by launchd
  (``--launchd``): serve the sockets the service manager passed instead of
  binding; they are the manager's, so no lock and no unlink at exit.
* ``compozy-agent install-service | uninstall-service``: see ``service_install``.
"""

from __future__ import annotations

import gc

if __name__ == "__main__":
    # Run as a program (the CLI starts agents with `python -m compozy_agent`): no
    # cyclic garbage collection while the agent imports and starts, about a tenth
    # of a cold start's CPU (docs/performance.md); on again once it serves
    # (_serve). Imported (tests, the console script's entry()), nothing changes here.
    gc.disable()

import argparse
import contextlib
import logging
import os
import resource
import signal
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import anyio

from compozy_agent.activation import ActivationError, inherited_sockets
from compozy_agent.server import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    AgentAlreadyRunning,
    AgentServer,
    BoundSocket,
    SocketSetupError,
    bind_socket,
)
from compozy_client import __version__
from compozy_client.paths import absolute_path_variables, default_socket_path, socket_path

if TYPE_CHECKING:
    import ssl

    from compozy_agent.store import SessionStore, StorageChoice, StoreError

log = logging.getLogger("compozy_agent")

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
#: The detached agent's log, in the state directory.
LOG_FILE: Final = "agent.log"

_EPILOG = """commands:
  compozy-agent install-service [--now]   let your login session start the agent (systemd/launchd)
  compozy-agent uninstall-service [--now]
  compozy-agent completion bash|zsh|fish  print a shell completion script

examples:
  compozy-agent                          # run in the foreground, logging to stderr
  compozy-agent --daemon                 # detach; logs go to the agent's log file
  eval "$(compozy-agent --sh)"           # in ~/.bashrc or ~/.zshrc: point the shell at an agent
  compozy-agent --fish | source          # the same for fish
  COMPOZY_AGENT_SOCK=/tmp/a.sock compozy-agent -v
  compozy-agent install-service --now    # systemd user units / launchd agent, enabled now
  compozy-agent --forward-socket "$XDG_RUNTIME_DIR/compozy/forward.sock" --forward-profile dev
                                         # plus a token-only socket for ssh -R (docs/services.md)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compozy-agent",
        description="Holds Compozy Cloud sessions, keeps their tokens fresh and hands them "
        "out over a private Unix socket.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"compozy-agent {__version__}")
    parser.add_argument("--socket", metavar="PATH",
                        help="socket path (default: $COMPOZY_AGENT_SOCK, else "
                        "$XDG_RUNTIME_DIR/compozy/agent.sock)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--daemon", "-d", action="store_true", help="detach after binding")
    mode.add_argument("--sh", "-s", action="store_true",
                      help="print sh/bash/zsh lines for the socket, starting an agent if needed")
    mode.add_argument("--csh", "-c", action="store_true", help="the same for csh/tcsh")
    mode.add_argument("--fish", action="store_true", help="the same for fish")
    mode.add_argument("--autostarted", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--log-file", metavar="PATH",
                        help="log here instead of stderr (default for --daemon: "
                        "<state dir>/agent.log)")
    parser.add_argument("--forward-socket", metavar="PATH",
                        help="also serve a restricted socket (hello, status, token only) for "
                        "forwarding to remote hosts with ssh -R")
    parser.add_argument("--forward-profile", action="append", metavar="NAME",
                        help="serve only this profile on the forwarding socket (repeatable; "
                        "default: every profile)")
    parser.add_argument("--launchd", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--verbose", "-v", action="store_true", help="log debug messages")
    parser.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT,
                        metavar="SECONDS", help="close connections idle this long")
    parser.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                        metavar="N", help="serve at most N connections at once on each socket "
                        "(a new one closes the longest-idle one)")
    return parser


#: What build_parser() makes of ``--autostarted`` alone, the command line the CLI
#: starts agents with (test_the_autostarted_command_line_is_parsed_as_the_parser_would).
_AUTOSTARTED: Final = {
    "socket": None, "daemon": False, "sh": False, "csh": False, "fish": False,
    "autostarted": True, "log_file": None, "forward_socket": None, "forward_profile": None,
    "launchd": False, "verbose": False, "idle_timeout": DEFAULT_IDLE_TIMEOUT,
    "max_connections": DEFAULT_MAX_CONNECTIONS,
}


def parse_options(args: list[str]) -> argparse.Namespace:
    """The options ``args`` give. An autostarted agent's one argument is read without
    building the parser: argparse's help formatter and translations load locale,
    shutil and the compression modules, about 7 ms of every cold start."""
    if args == ["--autostarted"]:
        return argparse.Namespace(**_AUTOSTARTED)
    return build_parser().parse_args(args)


_COMPLETION_EXAMPLES = """examples:
  source <(compozy-agent completion bash)      # in ~/.bashrc
  source <(compozy-agent completion zsh)       # in ~/.zshrc, after compinit
  compozy-agent completion fish > ~/.config/fish/completions/compozy-agent.fish
"""


def _print_completion_script(argv: list[str]) -> int:
    """``compozy-agent completion SHELL``: the same machinery as ``compozy completion``."""
    from compozy_client.commands import completion

    parser = argparse.ArgumentParser(
        prog="compozy-agent completion",
        description="Print a shell completion script for compozy-agent.",
        epilog=_COMPLETION_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("shell", choices=completion.SHELLS, metavar="SHELL",
                        help="bash, zsh or fish")
    options = parser.parse_args(argv)
    sys.stdout.write(completion.script(options.shell, "compozy-agent"))
    return EXIT_OK


def _completion_tree() -> argparse.ArgumentParser:
    """The command line as completion sees it: the options, and the commands main()
    dispatches before parsing them."""
    from compozy_agent import service_install
    from compozy_client.commands import completion

    parser = build_parser()
    commands = parser.add_subparsers(metavar="COMMAND")
    for command, help_text in (("install-service", "let your login session start the agent"),
                               ("uninstall-service", "remove what install-service installed")):
        commands.add_parser(command, help=help_text, add_help=False,
                            parents=[service_install.build_parser(command)])
    commands.add_parser("completion", help="print a shell completion script").add_argument(
        "shell", choices=completion.SHELLS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] in (["install-service"], ["uninstall-service"]):
        from compozy_agent import service_install

        return service_install.main(args)
    if args[:1] == ["completion"]:
        return _print_completion_script(args[1:])
    if args[:1] == ["__complete"]:
        # The completion scripts' helper (compozy_client/commands/completion.py).
        from compozy_client.commands import completion

        return completion.complete(_completion_tree(), args[1:], completion.dynamic_values)
    options = parse_options(args)
    _leave_the_working_directory(options)
    if options.sh or options.csh or options.fish:
        return _shell_mode(options, os.path.abspath(options.socket or socket_path()))
    detach = options.daemon or options.autostarted
    _disable_core_dumps()
    _raise_open_file_limit()
    try:
        _setup_logging(options.verbose,
                       options.log_file or (_default_log_file() if detach else None))
    except LogFileError as exc:
        print(f"compozy-agent: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        bound = _open_sockets(options)
    except AgentAlreadyRunning as exc:
        if options.autostarted:
            return EXIT_OK  # lost the start-up race; the winner serves
        print(f"compozy-agent: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except (SocketSetupError, ActivationError, OSError) as exc:
        log.error("%s", exc)  # a detached agent's stderr goes nowhere
        print(f"compozy-agent: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    path = next(b.path for b in bound if b.kind == "full")
    if options.daemon and os.fork() > 0:
        # The parent: the child owns the sockets and locks from here on.
        for item in bound:
            item.sock.close()
            if item.lock_fd is not None:
                os.close(item.lock_fd)
        print(f"compozy-agent: serving {path}", file=sys.stderr)
        return EXIT_OK
    if detach:
        _detach(options.daemon)
    from compozy_agent.store import StoreError
    from compozy_agent.tls import start_building

    try:
        anyio.run(_serve, options, bound, path, start_building())
    except StoreError as exc:  # an unusable state directory: nothing could be kept
        log.error("%s", exc)
        print(f"compozy-agent: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        for item in bound:
            item.cleanup()
    return EXIT_OK


def _leave_the_working_directory(options: argparse.Namespace) -> None:
    """Work in ``/``, like any daemon: nothing relative may resolve into the starting directory.

    The directory we were started in may be a cloned repository; an agent that
    keeps it as its working directory would read any relative path there. The
    paths given relative to it (options, ``COMPOZY_*`` and ``XDG_*`` paths) are
    made absolute first, so they keep naming what the person meant.
    """
    for name in ("socket", "log_file", "forward_socket"):
        value = getattr(options, name)
        if value:
            setattr(options, name, os.path.abspath(value))
    absolute_path_variables(os.environ)
    os.chdir("/")


def _open_sockets(options: argparse.Namespace) -> list[BoundSocket]:
    """The sockets passed by systemd/launchd, else our own; plus ``--forward-socket``."""
    bound = inherited_sockets(launchd=options.launchd)
    if bound:
        log.info("serving %d socket(s) passed by the service manager: %s", len(bound),
                 ", ".join(f"{item.path} ({item.kind})" for item in bound))
        if options.socket:
            log.warning("--socket %s is ignored: the service manager passed the sockets",
                        options.socket)
        if options.launchd:
            bound += _also_default_path(bound)
    else:
        bound = [bind_socket(os.path.abspath(options.socket or socket_path()))]
    try:
        if options.forward_socket and not any(item.kind == "forward" for item in bound):
            bound.append(bind_socket(os.path.abspath(options.forward_socket), kind="forward"))
    except BaseException:
        for item in bound:
            item.cleanup()
            item.sock.close()
        raise
    forward = [item.path for item in bound if item.kind == "forward"]
    if forward:
        log.info("forwarding socket %s: hello, status and token only, for %s", forward[0],
                 ", ".join(options.forward_profile) if options.forward_profile
                 else "every profile")
    elif options.forward_profile:
        log.warning("--forward-profile has no effect without a forwarding socket")
    return bound


def _also_default_path(bound: list[BoundSocket]) -> list[BoundSocket]:
    """Under launchd, also serve the CLI's default path.

    launchd exports COMPOZY_AGENT_SOCK to the GUI login session only; an ssh
    login's CLI computes the default path instead and would start a second
    agent there, with a second copy of every session.
    """
    default = default_socket_path()
    if any(os.path.abspath(item.path) == default for item in bound):
        return []
    try:
        return [bind_socket(default)]
    except (AgentAlreadyRunning, SocketSetupError, OSError) as exc:
        log.warning("not also serving the default path %s: %s", default, exc)
        return []


#: The GIL's switch interval while the keyring is probed beside the imports (seconds).
STARTING_SWITCH_INTERVAL: Final = 0.0005


async def _serve(options: argparse.Namespace, bound: list[BoundSocket], path: str,
                 tls_context: Callable[[], ssl.SSLContext]) -> None:
    from compozy_agent.agent_lock import LOCK_FILE, AgentLock, describe_locked_at
    from compozy_agent.audit import AuditLog
    from compozy_agent.clock import SystemClock
    from compozy_client.config import load_config
    from compozy_client.errors import ConfigError

    storage: StorageChoice = "auto"
    try:
        storage = load_config().storage
    except ConfigError as exc:
        log.error("%s; using automatic storage", exc)
    # A cold start (docs/performance.md): the CA bundle has been loading in its
    # own thread since before anyio started (OpenSSL releases the GIL there); the
    # keyring's probe waits on D-Bus in the keyring's thread while this thread
    # imports the HTTP stack and the session rooms.
    # Each D-Bus answer wakes the keyring's thread, which then waits for the GIL
    # this thread holds while importing: for up to the switch interval (5 ms),
    # a dozen times over. A shorter interval while both run lets the probe
    # finish alongside the imports instead of after them.
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(STARTING_SWITCH_INTERVAL)
    keyring_loaded = anyio.Event()
    opened: list[SessionStore | StoreError] = []
    try:
        async with anyio.create_task_group() as opening:
            opening.start_soon(_open_session_store, storage, keyring_loaded.set, opened)
            await keyring_loaded.wait()
            from compozy_agent.http import ProviderClient
            from compozy_agent.manager import SessionManager

            context = await anyio.to_thread.run_sync(tls_context)
            provider = ProviderClient(time.time, ssl_context=context)
    finally:
        sys.setswitchinterval(switch_interval)
    store = opened[0]
    if isinstance(store, BaseException):
        raise store  # a StoreError: main() says why, as for any unusable state directory
    log.info("secrets: %s (%s)", store.info.backend, store.info.detail)
    backend = SessionManager(store, provider)
    forwarded = frozenset(options.forward_profile) if options.forward_profile else None
    clock = SystemClock()
    # Before anything is served: a lock left by an earlier agent holds for this one.
    agent_lock = AgentLock.load(clock, os.path.join(store.state_dir, LOCK_FILE))
    if agent_lock.unusable is not None:
        log.error("%s", agent_lock.unusable)
    elif agent_lock.locked:
        log.warning("starting locked: the agent was locked%s (%d wrong passphrase(s) since); "
                    "`compozy auth unlock` unlocks it", describe_locked_at(agent_lock),
                    agent_lock.failures)
    audit = AuditLog(store.state_dir)
    audit.open()
    server = AgentServer(backend, socket_path=path, idle_timeout=options.idle_timeout,
                         max_connections=options.max_connections, forward_profiles=forwarded,
                         audit=audit, clock=clock, lock=agent_lock)
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(_stop_on_signal, group.cancel_scope)
            group.start_soon(audit.run, clock)
            await group.start(backend.run)
            ready = anyio.Event()
            group.start_soon(server.serve, bound, ready)
            await ready.wait()
            # Off while starting (the top of this module). What starting made is kept
            # out of collections from now on (it lives as long as the agent); else
            # the first collection, due at once, would scan all of it before the
            # first answer.
            gc.freeze()
            gc.enable()
            log.debug("garbage collection on; %d objects from the start are kept out of it",
                      gc.get_freeze_count())
            log.info("compozy-agent %s (pid %d) serving %s", __version__, os.getpid(), path)
    finally:
        gc.enable()
        audit.close()
        with anyio.CancelScope(shield=True):
            await provider.aclose()


async def _open_session_store(storage: StorageChoice, loaded: Callable[[], object],
                              opened: list[SessionStore | StoreError]) -> None:
    """Append the store to ``opened``, or the StoreError that left none (raised by the
    caller, outside the task group, which would wrap it)."""
    from compozy_agent.store import (
        SecretStoreUnavailable,
        SessionStore,
        StoreError,
        UnavailableSecrets,
        open_store,
    )

    try:
        store = await open_store(storage, state_dir(), loaded=loaded)
    except SecretStoreUnavailable as exc:
        # Keep serving: status shows why, logins work (their refresh tokens stay in
        # memory, the writes are retried), and the stored sessions are left untouched.
        log.error("%s", exc)
        store = SessionStore(state_dir(), UnavailableSecrets(str(exc)), str(exc))
    except StoreError as exc:
        opened.append(exc)
        return
    opened.append(store)


async def _stop_on_signal(scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("received %s; shutting down", signal.Signals(signum).name)
            scope.cancel()
            return


def _disable_core_dumps() -> None:
    """A core dump would hold every token in memory: turn them off, as ssh-agent does."""
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_dumpable = 4  # <linux/prctl.h>; also stops same-user ptrace attach
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_dumpable, 0, 0, 0, 0)


def _raise_open_file_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit: every connection costs a descriptor.

    The soft limit is often 1,024 while the hard one is far higher; the server
    sizes its connection pools from what this leaves (``server.RESERVED_DESCRIPTORS``).
    """
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == hard:
            return
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            # macOS refuses a soft limit above OPEN_MAX even when the hard one is unlimited.
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 10240)), hard))


def _detach(new_session: bool) -> None:
    if new_session:
        with contextlib.suppress(OSError):
            os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def state_dir() -> str:
    """``$COMPOZY_STATE_DIR``, else platformdirs' user state dir for compozy."""
    explicit = os.environ.get("COMPOZY_STATE_DIR", "").strip()
    if explicit:
        return explicit
    import platformdirs

    return platformdirs.user_state_dir("compozy")


def _default_log_file() -> str:
    return os.path.join(state_dir(), LOG_FILE)


class LogFileError(Exception):
    """The log file, or the state directory it would go in, cannot be used safely."""


def _setup_logging(verbose: bool, log_file: str | None) -> None:
    """Log to ``log_file`` (a private file, see ``audit.open_private_log``), else stderr.

    The default log file is in the state directory, which is checked (ours, not
    writable by others; made 0700 if missing) before anything is written into it.
    """
    from compozy_agent.audit import open_private_log
    from compozy_agent.store import StoreError, prepare_state_dir

    handler: logging.Handler
    if log_file:
        log_file = os.path.abspath(log_file)
        directory = os.path.dirname(log_file)
        try:
            if directory == os.path.abspath(state_dir()):
                prepare_state_dir(directory)
            else:  # a place the person chose with --log-file: created if missing, as before
                os.makedirs(directory, mode=0o700, exist_ok=True)
            fd = open_private_log(log_file)
        except StoreError as exc:
            raise LogFileError(f"not logging to {log_file}: {exc}") from None
        except OSError as exc:
            raise LogFileError(f"cannot log to {log_file}: {exc.strerror or exc}") from None
        handler = logging.StreamHandler(os.fdopen(fd, "a", buffering=1, encoding="utf-8"))
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("httpx", "httpcore", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _shell_mode(options: argparse.Namespace, path: str) -> int:
    """Print shell lines for ``path``; start a detached agent first if none answers."""
    from compozy_client.connection import connect
    from compozy_client.errors import CompozyError
    from compozy_client.protocol import Hello, HelloResult

    os.environ["COMPOZY_AGENT_SOCK"] = path
    # Asking for the shell lines is asking for an agent: COMPOZY_AGENT_AUTOSTART=0
    # only stops the CLI from starting one behind a person's back.
    os.environ.pop("COMPOZY_AGENT_AUTOSTART", None)
    try:
        with connect(path, timeout=10.0, autostart=True) as conn:
            pid = conn.call(Hello(id=0), HelloResult).pid
    except CompozyError as exc:
        print(f"compozy-agent: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    quoted = _shell_quote(path)
    if options.csh:
        print(f"setenv COMPOZY_AGENT_SOCK {quoted};")
        print(f"echo Agent pid {pid};")
    elif options.fish:
        print(f"set -gx COMPOZY_AGENT_SOCK {quoted};")
        print(f"echo Agent pid {pid};")
    else:
        print(f"COMPOZY_AGENT_SOCK={quoted}; export COMPOZY_AGENT_SOCK;")
        print(f"echo Agent pid {pid};")
    return EXIT_OK


def _shell_quote(value: str) -> str:
    import shlex

    return shlex.quote(value)


def entry() -> None:
    gc.disable()  # the console script: as when run with -m (the top of this module)
    sys.exit(main())


if __name__ == "__main__":
    entry()
