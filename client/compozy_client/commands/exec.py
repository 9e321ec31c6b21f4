"""`compozy exec -- COMMAND...`: run a command that gets a pointer to credentials, not a secret.

The agent binds a socket for the child alone (the ``exec_socket`` op,
docs/protocol.md): it serves ``token`` and ``status`` for one profile and at
most the asked scope and audience, and the agent removes it when this
process's connection closes, so it is gone when the command has ended, and
also when this process is killed. The child finds it in ``COMPOZY_AGENT_SOCK``;
every ``compozy auth token`` and ``get_token()`` inside it asks there, for as
long as the command runs, so tokens never go stale in the environment (the
flaw of ``aws-vault exec``). ``--env VAR`` also puts one token in ``VAR`` for
tools that read nothing else; ``--token-file PATH`` keeps a 0600 file fresh.

The command's exit status is ours (killed by signal N: 128 + N, as a shell
says). SIGINT, SIGTERM and SIGHUP sent to us are passed to the command; those
the terminal sends to its whole foreground process group (Ctrl-C) reach the
command directly and are not passed a second time. On Linux and the BSDs the
signals are taken with ``sigtimedwait`` (which says who sent them); elsewhere
(macOS) with handlers, which pass on every one.

Imports only os at load time (the parser of every command imports it).
"""

from __future__ import annotations

import os

from compozy_client.commands.common import add_command, profile_option, split_scopes

# No typing import at run time: see compozy_client/__init__.py.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any

    from compozy_client.connection import AgentConnection
    from compozy_client.protocol import Token, TokenResult


EXAMPLES = """examples:
  compozy exec -- ./deploy.sh                  # inside: compozy auth token, get_token() just work
  compozy exec --profile prod --scope compozy:read -- python report.py
  compozy exec --token-file /tmp/cz-token -- terraform apply
                                               # the file holds a fresh token until the end
  compozy exec --env COMPOZY_TOKEN -- legacy-tool   # one token in $COMPOZY_TOKEN (see --env)

The command gets COMPOZY_AGENT_SOCK (a socket of its own, gone when it ends),
COMPOZY_PROFILE and COMPOZY_AGENT_AUTOSTART=0; never a token unless --env asks.
Exit status: the command's; 128+N when it was killed by signal N."""

#: Signals passed on to the command.
FORWARDED_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")
#: siginfo's si_code of a signal the kernel sent (a terminal's Ctrl-C, a hangup): it went
#: to the whole foreground process group, the command included (Linux <asm/siginfo.h>).
SI_KERNEL = 0x80
#: Variables the child's environment is built on, which --env must not replace.
RESERVED_VARIABLES = ("COMPOZY_AGENT_SOCK", "COMPOZY_PROFILE", "COMPOZY_AGENT_AUTOSTART")
#: The first token (for --env and --token-file) stays valid at least this long.
FIRST_TOKEN_MIN_VALID = 60.0
#: --token-file: rewritten when this share of the token's lifetime has passed...
REFRESH_AT_SHARE = 2.0 / 3.0
#: ...but never more often than this (seconds), and after a failure retried this late at most.
MIN_REFRESH_INTERVAL = 1.0
MAX_RETRY_INTERVAL = 10.0
#: The longest wait between two looks at whether the command has ended (seconds).
CHILD_CHECK_INTERVAL = 1.0
#: How long to wait at the end for the agent to remove the command's socket (seconds).
SOCKET_REMOVAL_WAIT = 5.0
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127


def add_parser(subparsers: Any) -> None:
    import argparse

    parser = add_command(subparsers, "exec", "Run a command with access to tokens (a socket "
                         "of its own, not a secret in its environment)", EXAMPLES)
    profile_option(parser)
    parser.add_argument("--scope", action="append", metavar="SCOPE",
                        help="the command gets tokens of at most this scope (repeatable)")
    parser.add_argument("--audience", metavar="URI",
                        help="the command gets tokens for this API only (RFC 8707)")
    parser.add_argument("--env", metavar="VAR",
                        help="also put one access token in $VAR. It is NOT refreshed: it "
                        "expires while a long command runs, and every process of your user "
                        "can read it (/proc/PID/environ); prefer the socket or --token-file")
    parser.add_argument("--token-file", metavar="PATH",
                        help="keep a fresh access token in this file (0600, replaced "
                        "atomically before expiry, removed at the end); it must not exist yet")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND...",
                        help="the command and its arguments")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from compozy_client.chain import resolve_profile
    from compozy_client.commands.common import connect
    from compozy_client.connection import AgentConnection
    from compozy_client.errors import UsageError
    from compozy_client.protocol import ExecSocket, ExecSocketResult, Token, TokenResult

    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise UsageError("no command to run; usage: compozy exec [options] -- COMMAND...")
    _check_env_name(args.env)
    token_file = TokenFile(os.path.abspath(args.token_file)) if args.token_file else None
    profile = resolve_profile(args.profile)
    scope = split_scopes(args.scope)
    with connect() as conn:
        # This connection is the socket's lease: the agent removes the socket when it closes.
        path = conn.call(ExecSocket(id=0, profile=profile, scope=scope, audience=args.audience),
                         ExecSocketResult).path
        # A first token through the command's own socket: a session that needs a login
        # says so now, before the command runs.
        request = Token(id=0, profile=profile, min_valid=FIRST_TOKEN_MIN_VALID)
        with AgentConnection.open(path) as child_conn:
            first = child_conn.call(request, TokenResult)
        env = dict(os.environ)
        env.update(COMPOZY_AGENT_SOCK=path, COMPOZY_PROFILE=profile,
                   # Once the socket is gone, nothing inside may start an agent in its place.
                   COMPOZY_AGENT_AUTOSTART="0")
        if args.env:
            env[args.env] = first.access_token
        refresher = None
        if token_file is not None:
            token_file.create(first.access_token)
            request.scope, request.audience = scope, args.audience
            refresher = Refresher(conn, request, first, token_file)
        try:
            return supervise(command, env, refresher)
        finally:
            if token_file is not None:
                token_file.remove()
            # Gone before we exit, so that whoever waits for us finds it gone.
            conn.close_and_wait(SOCKET_REMOVAL_WAIT)


def _check_env_name(name: str | None) -> None:
    from compozy_client.errors import UsageError

    if name is None:
        return
    if not name or not (name[0].isalpha() or name[0] == "_") or \
            not all(c.isascii() and (c.isalnum() or c == "_") for c in name):
        raise UsageError(f"--env {name!r} is not a variable name (letters, digits, _)")
    if name in RESERVED_VARIABLES:
        raise UsageError(f"--env {name} would replace what the command needs to reach "
                         "its socket; choose another name")


class TokenFile:
    """A file holding one access token: created 0600, replaced atomically, removed at exit.

    Only a path that does not exist yet is taken, so no file of the person's is
    replaced, and at exit only the file we wrote last is removed.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        #: What names the file we wrote last (inodes are reused: not the inode alone).
        self._identity: tuple[int, int, int, int] | None = None

    def create(self, token: str) -> None:
        from compozy_client.errors import UsageError

        if os.path.lexists(self.path):
            raise UsageError(f"--token-file {self.path} already exists; choose a path that "
                             "does not (it is removed when the command ends)")
        if not os.path.isdir(os.path.dirname(self.path)):
            raise UsageError(f"--token-file {self.path}: its directory does not exist")
        try:
            self.write(token)
        except OSError as exc:
            raise UsageError(f"cannot write --token-file {self.path}: "
                             f"{exc.strerror or exc}") from None

    def write(self, token: str) -> None:
        """Write ``token`` to a new 0600 file beside the path, then rename it over the path."""
        import tempfile

        directory, name = os.path.split(self.path)
        fd, temporary = tempfile.mkstemp(prefix=f".{name}.", dir=directory)  # 0600, O_EXCL
        try:
            data = token.encode() + b"\n"
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
            info = os.fstat(fd)  # a rename changes neither size nor mtime
        except BaseException:
            os.close(fd)
            os.unlink(temporary)
            raise
        os.close(fd)
        os.replace(temporary, self.path)
        self._identity = _identity(info)

    def remove(self) -> None:
        if self._identity is None:
            return
        try:
            if _identity(os.lstat(self.path)) == self._identity:
                os.unlink(self.path)
        except OSError:
            pass
        self._identity = None


def _identity(info: os.stat_result) -> tuple[int, int, int, int]:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


class Refresher:
    """Keeps a :class:`TokenFile` fresh: rewritten once REFRESH_AT_SHARE of each token's
    lifetime has passed, with a token that outlives the one in the file."""

    def __init__(self, conn: AgentConnection, request: Token, first: TokenResult,
                 token_file: TokenFile) -> None:
        self.conn: AgentConnection | None = conn
        self.request = request
        self.token_file = token_file
        self.expires_at = first.expires_at
        self.due: float | None = None
        self.failing = False
        self._schedule(first.expires_at)

    def _schedule(self, expires_at: float | None) -> None:
        import time

        now = time.time()
        if expires_at is None:  # an API key, or a token the provider gave no lifetime
            self.due = None
            return
        self.due = now + max(MIN_REFRESH_INTERVAL, (expires_at - now) * REFRESH_AT_SHARE)

    def seconds_until_due(self) -> float | None:
        import time

        return None if self.due is None else max(0.0, self.due - time.time())

    def refresh(self) -> None:
        """Write a newer token, or warn and try again soon (the file keeps the old one)."""
        import time

        from compozy_client.commands.output import warn
        from compozy_client.connection import connect
        from compozy_client.errors import AgentUnavailable, CompozyError
        from compozy_client.protocol import TokenResult

        now = time.time()
        left = (self.expires_at - now) if self.expires_at is not None else 0.0
        # More than the current token has left: the agent hands out a newer one.
        self.request.min_valid = max(0.0, left) + 1.0
        try:
            if self.conn is None:
                self.conn = connect(autostart=False)
            result = self.conn.call(self.request, TokenResult)
            self.token_file.write(result.access_token)
        except (CompozyError, OSError) as exc:
            if isinstance(exc, AgentUnavailable) and self.conn is not None:
                self.conn.close()
                self.conn = None
            if not self.failing:
                warn(f"compozy exec: could not refresh {self.token_file.path}: {exc}; "
                     "trying again")
            self.failing = True
            self.due = now + min(MAX_RETRY_INTERVAL, max(MIN_REFRESH_INTERVAL, left / 2))
            return
        if self.failing:
            warn(f"compozy exec: {self.token_file.path} is fresh again")
        self.failing = False
        self.expires_at = result.expires_at
        self._schedule(result.expires_at)


def supervise(command: list[str], env: dict[str, str], refresher: Refresher | None) -> int:
    """Run ``command`` with ``env``; pass signals on and keep ``refresher``'s file fresh
    until it ends. Its exit code, as a shell gives it."""
    import contextlib
    import signal

    if not hasattr(signal, "sigtimedwait"):
        return _supervise_with_handlers(command, env, refresher)
    forwarded = {getattr(signal, name) for name in FORWARDED_SIGNALS}
    watched = forwarded | {signal.SIGCHLD}
    # Ignored SIGCHLD (inherited from whoever started us) would reap the command unseen.
    previous_sigchld = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    # Blocked, so that they wait for sigtimedwait: nothing is lost between two waits.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    try:
        pid = _spawn(command, env, previous)
        if pid < 0:
            return -pid
        while True:
            due = refresher.seconds_until_due() if refresher is not None else None
            # At most CHILD_CHECK_INTERVAL: a SIGCHLD taken by another thread (none in
            # the CLI; an embedding program may have some) must not leave us waiting.
            wait = CHILD_CHECK_INTERVAL if due is None else min(due, CHILD_CHECK_INTERVAL)
            info = signal.sigtimedwait(watched, wait)
            if info is None or info.si_signo == signal.SIGCHLD:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done == pid:
                    return _exit_code(status)
                if refresher is not None and refresher.seconds_until_due() == 0.0:
                    refresher.refresh()
                continue  # running, stopped or continued
            if info.si_code == SI_KERNEL:
                continue  # the terminal sent it to the command as well
            with contextlib.suppress(ProcessLookupError):  # ended: its SIGCHLD is next
                os.kill(pid, info.si_signo)
    finally:
        # Signals that came after the command ended are not for us: let none of them
        # act when the mask is restored.
        while signal.sigtimedwait(watched, 0) is not None:
            pass
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        if previous_sigchld is not None:
            signal.signal(signal.SIGCHLD, previous_sigchld)


def _supervise_with_handlers(command: list[str], env: dict[str, str],
                             refresher: Refresher | None) -> int:
    """:func:`supervise` where ``sigtimedwait`` is missing: handlers pass on every signal,
    a thread keeps the token file fresh."""
    import contextlib
    import signal
    import threading

    pid = _spawn(command, env, None)
    if pid < 0:
        return -pid
    ended = threading.Event()

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    def keep_fresh() -> None:
        assert refresher is not None
        while not ended.wait(refresher.seconds_until_due()):
            refresher.refresh()

    previous = {name: signal.signal(getattr(signal, name), forward) for name in FORWARDED_SIGNALS}
    thread = threading.Thread(target=keep_fresh, daemon=True) if refresher is not None else None
    try:
        if thread is not None:
            thread.start()
        _, status = os.waitpid(pid, 0)
        return _exit_code(status)
    finally:
        ended.set()
        if thread is not None:
            thread.join()
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)


def _spawn(command: list[str], env: dict[str, str], sigmask: Any) -> int:
    """Start ``command`` (searched on PATH) with the caller's signal mask and default
    SIGPIPE/SIGXFSZ (Python ignores them; a command must not inherit that). Its pid, or
    when it could not be started (said on stderr) minus the shell's exit code for that
    (127 not found, 126 not executable)."""
    import errno
    import signal

    from compozy_client.commands.output import error

    reset = {getattr(signal, name) for name in ("SIGPIPE", "SIGXFSZ") if hasattr(signal, name)}
    options: dict[str, Any] = {"setsigdef": reset}
    if sigmask is not None:
        options["setsigmask"] = sigmask
    try:
        return os.posix_spawnp(command[0], command, env, **options)
    except OSError as exc:
        error(f"compozy exec: {command[0]}: {exc.strerror or exc}")
        return -(EXIT_NOT_FOUND if exc.errno == errno.ENOENT else EXIT_NOT_EXECUTABLE)


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code

