"""`compozy login`: a browser or device login at the provider, or an API key to keep.

The agent runs the login (``login_start``, then ``login_wait`` until a person
completes it); this command opens the browser on a private launch page (never
the authorization URL in argv), or prints the device code (at a terminal with a
display, offering to open the device page on Enter), shows a status line while
it waits (:mod:`compozy_client.commands.waiting`), and prints the outcome.
``--with-api-key`` reads a key from stdin and has the agent store it.
"""

from __future__ import annotations

import os
import sys
import time

from compozy_client.commands.common import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    add_command,
    connect,
    is_interactive,
    profile_option,
    split_scopes,
)
from compozy_client.commands.output import MESSAGE_LIMIT, info, warn
from compozy_client.commands.waiting import WaitDisplay

# No typing import at run time: see compozy_client/__init__.py.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable
    from typing import Any, Literal

    from compozy_client.connection import AgentConnection
    from compozy_client.protocol import SessionInfo


#: How long `compozy login` waits for the person, unless --timeout says otherwise.
LOGIN_TIMEOUT = 300.0

EXAMPLES = """examples:
  compozy login                         # browser login (authorization code + PKCE)
  compozy login --device                # show a code to enter on another device
  compozy login --no-browser            # print the URL instead of opening it
  compozy login --profile staging --issuer https://auth.staging.example
  echo "$KEY" | compozy login --with-api-key --profile prod"""


def add_parser(subparsers: Any) -> None:
    parser = add_command(subparsers, "login", "Log in to Compozy Cloud", EXAMPLES)
    profile_option(parser)
    parser.add_argument("--issuer", metavar="URL", help="the OpenID provider ($COMPOZY_ISSUER)")
    parser.add_argument("--client-id", metavar="ID",
                        help="the OAuth client id ($COMPOZY_CLIENT_ID)")
    parser.add_argument(
        "--scope", action="append", metavar="SCOPE", help="a scope to ask for (repeatable)"
    )
    flow = parser.add_mutually_exclusive_group()
    flow.add_argument("--device", action="store_true", help="use the device code flow")
    flow.add_argument(
        "--no-browser", action="store_true", help="print the login URL instead of opening it"
    )
    flow.add_argument(
        "--with-api-key",
        action="store_true",
        help="read an API key from stdin and keep it in the agent's secure storage",
    )
    parser.add_argument(
        "--timeout", type=float, default=LOGIN_TIMEOUT, metavar="SECONDS",
        help=f"give up after this long (default {LOGIN_TIMEOUT:.0f})",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from compozy_client.chain import env_api_key, resolve_profile

    profile = resolve_profile(args.profile)
    if args.with_api_key:
        return _login_with_api_key(profile)
    shadow = env_api_key()
    if shadow is not None:
        warn("FLYZT_API_KEY is set: commands will keep using it instead of this login "
             "until you unset it")
    from compozy_client.protocol import LoginStart, LoginStartResult
    from compozy_client.safetext import one_line

    use_device = args.device or (not args.no_browser and not _can_open_browser())
    flow: Literal["browser", "device"] = "device" if use_device else "browser"
    request = LoginStart(
        id=0,
        profile=profile,
        flow=flow,
        issuer=args.issuer or os.environ.get("COMPOZY_ISSUER") or None,
        client_id=args.client_id or os.environ.get("COMPOZY_CLIENT_ID") or None,
        scope=split_scopes(args.scope),
    )
    launcher: str | None = None  # the private directory of the page the browser opens
    prompt: str | None = None  # the device flow's offer to open the browser on Enter
    open_on_enter: Callable[[], str] | None = None
    login_id: str | None = None
    try:
        with connect() as conn:
            try:
                started = conn.call(request, LoginStartResult)
                login_id = started.login_id
                if started.flow == "browser":
                    assert started.authorization_url is not None
                    opened = False
                    if not args.no_browser:
                        info(f"Opening your browser to log in to {started.issuer} ...")
                        launcher = _browser_launcher(started.authorization_url)
                        opened = launcher is not None and _open_browser(launcher)
                    if not opened:
                        info("Open this URL in a browser to log in:")
                    info(f"  {started.authorization_url}")
                else:
                    # Verbatim: some providers match user codes case-sensitively and
                    # without the hyphen others print (django-oauth-toolkit).
                    info(f"To log in to {started.issuer}, open {started.verification_uri} and "
                         f"enter the code {started.user_code} exactly as shown")
                    if started.verification_uri_complete:
                        info(f"  or open: {started.verification_uri_complete}")
                    target = started.verification_uri_complete or started.verification_uri
                    if target and _offers_to_open_the_browser():
                        launcher = _browser_launcher(target)
                        if launcher is not None:
                            prompt = f"Press Enter to open {target} in your browser"
                            open_on_enter = _opener(launcher)
                lasts = min(args.timeout, started.expires_in or args.timeout)
                display = WaitDisplay("Waiting for approval in the browser",
                                      time.monotonic() + lasts,
                                      prompt=one_line(prompt, MESSAGE_LIMIT) if prompt else None,
                                      open_on_enter=open_on_enter)
                try:
                    display.start()  # inside: a Ctrl-C while it starts still erases the line
                    session = _wait_for_login(conn, started.login_id, args.timeout)
                finally:
                    display.stop()
            except KeyboardInterrupt:
                # Cancel while this connection is still open: closing it first would
                # end the login for another reason at the agent (its connection closed).
                if login_id is not None:
                    _cancel_login(login_id)
                    login_id = None
                raise
    except KeyboardInterrupt:
        # The person chose to stop: end the login at the agent now, not after its
        # current answer (up to 25 s), and say nothing that sounds like a failure.
        if login_id is not None:
            _cancel_login(login_id)
        info("Login cancelled")
        return EXIT_INTERRUPTED
    finally:
        if launcher is not None:
            import shutil

            shutil.rmtree(launcher, ignore_errors=True)
    account = f" as {session.account}" if session.account else ""
    info(f"Logged in to {session.issuer}{account} (profile {session.profile})")
    if session.token_type == "DPoP":  # RFC 9449: say so, it changes which tools work
        from compozy_client.commands.output import token_binding

        info(f"  Tokens: {token_binding(session)}: usable with proofs from the agent "
             "(compozy auth dpop-proof, the httpx and requests adapters), not as bearer tokens")
    return EXIT_OK


def _wait_for_login(conn: AgentConnection, login_id: str, timeout: float) -> SessionInfo:
    from compozy_client.errors import LoginFailed
    from compozy_client.protocol import Empty, LoginCancel, LoginWait, LoginWaitResult

    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            conn.call(LoginCancel(id=0, login_id=login_id), Empty)
            raise LoginFailed("login_timeout", f"no login completed within {timeout:.0f} s")
        wait = min(left, 25.0)
        result = conn.call(LoginWait(id=0, login_id=login_id, timeout=wait), LoginWaitResult,
                           timeout=wait + 10.0)
        if result.state == "done" and result.session is not None:
            return result.session


#: How long an interrupted login waits for the agent to confirm the cancel.
CANCEL_TIMEOUT = 3.0


def _cancel_login(login_id: str) -> None:
    """Cancel the login at the agent, on a connection of its own.

    The login's connection is busy: the agent answers one request at a time per
    connection and is holding a ``login_wait`` open, so a cancel sent there would
    be read only after that answer. On a second connection it ends the login at
    once (its loopback listener or device polling too). Best effort: when the
    agent cannot be reached, the login still ends when the login's connection
    closes, as this process exits.
    """
    from compozy_client.connection import connect as connect_to_agent
    from compozy_client.errors import CompozyError
    from compozy_client.protocol import Empty, LoginCancel

    try:
        with connect_to_agent(timeout=CANCEL_TIMEOUT, autostart=False) as conn:
            conn.call(LoginCancel(id=0, login_id=login_id), Empty)
    except (CompozyError, OSError, KeyboardInterrupt):
        pass  # a second Ctrl-C, or no agent: the closing connection ends the login


def _offers_to_open_the_browser() -> bool:
    """Whether the device flow offers to open the browser on Enter (as ``gh auth login``
    does): only for a person at a terminal (stdin a tty, not CI), where a browser can
    be shown. Nobody is ever asked, let alone waited for, in a script."""
    return is_interactive() and _can_open_browser()


def _opener(launcher: str) -> Callable[[], str]:
    """What Enter does: open the launcher page; returns the line to print."""
    def open_it() -> str:
        if _open_browser(launcher):
            return "Opened your browser"
        return "Could not open a browser; open the address above yourself"
    return open_it


def _can_open_browser() -> bool:
    """False where a browser cannot be shown: over SSH or with no display."""
    if os.environ.get("BROWSER"):
        return True
    if sys.platform == "darwin" or sys.platform == "win32":
        return not os.environ.get("SSH_CONNECTION")
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


#: The page the browser opens: it sends the browser on to the authorization URL.
_LAUNCH_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="referrer" content="no-referrer">
<meta http-equiv="refresh" content="0; url={attribute}">
<title>Compozy login</title>
<script>window.location.replace({script});</script>
</head><body><p>Opening the login page&hellip; <a href="{attribute}">continue</a></p></body>
</html>
"""
LAUNCH_PAGE_NAME = "login.html"


def _browser_launcher(url: str) -> str | None:
    """A private directory holding a page that redirects to ``url``; None if ``url`` is
    not a web address.

    The browser is given this page's path, never the authorization URL: a process's
    argv is readable by every user of the machine (/proc/<pid>/cmdline), and the URL
    holds the login's ``state`` and loopback port, which another user could use to
    complete the login with their own account. The directory is 0700 (``mkdtemp``),
    under the runtime directory when there is one; the page is 0600; the caller
    removes both when the login ends.
    """
    import html
    import json
    import tempfile

    from compozy_client.paths import runtime_dir

    if not url.startswith(("https://", "http://")):
        return None
    base = runtime_dir()
    directory = tempfile.mkdtemp(prefix="compozy-login-",
                                 dir=base if base and os.path.isdir(base) else None)
    script = json.dumps(url).replace("<", "\\u003c").replace(">", "\\u003e") \
        .replace("&", "\\u0026")
    page = _LAUNCH_PAGE.format(attribute=html.escape(url, quote=True), script=script)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    with os.fdopen(os.open(os.path.join(directory, LAUNCH_PAGE_NAME), flags, 0o600), "w",
                   encoding="utf-8") as file:
        file.write(page)
    return directory


def _open_browser(launcher: str) -> bool:
    """Open the launcher page (see _browser_launcher) in the person's browser."""
    import webbrowser
    from urllib.parse import quote

    try:
        return webbrowser.open("file://" + quote(os.path.join(launcher, LAUNCH_PAGE_NAME)),
                               new=1)
    except webbrowser.Error:
        return False


def _login_with_api_key(profile: str) -> int:
    from compozy_client.errors import UsageError
    from compozy_client.protocol import SessionInfo, StoreApiKey

    if sys.stdin.isatty():
        import getpass

        key = getpass.getpass("API key: ").strip()
    else:
        key = sys.stdin.read().strip()
    if not key:
        raise UsageError("no API key on standard input")
    if any(ch.isspace() for ch in key):
        raise UsageError("an API key has no spaces or line breaks; pass exactly one key")
    with connect() as conn:
        session = conn.call(StoreApiKey(id=0, profile=profile, api_key=key), SessionInfo)
    where = "secure storage" if session.persisted else "memory (no secure storage available)"
    info(f"Stored an API key for profile {profile} in the agent's {where} "
         f"(token id {session.token_id})")
    return EXIT_OK
