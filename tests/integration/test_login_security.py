"""Attacks on the browser login, against a real agent and the real CLI.

Another user on the machine reading process lists and reaching 127.0.0.1; a
malicious issuer configured for one profile (mix-up, RFC 9207); a provider
whose text tries to forge log lines and drive the terminal; a client opening
logins without end. The honest provider is the real one (tests/provider) where
a person logs in; the attacker is the fake (tests/support/fake_provider.py).
"""

from __future__ import annotations

import json
import os
import pwd
import re
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
import pytest

from compozy_agent.logins import MAX_LOGINS
from support.agent import AgentEnv, run_cli, start_agent
from support.fake_provider import TOKEN, Behaviour, FakeProvider, run_fake_provider_in_thread
from support.login import CLI, configure, get_as_another_user, reaped
from support.provider import OidcTestProvider, approve_device, complete_browser_login
from support.wire import ask

SCOPES = "[openid, profile, email, offline_access]"


def write_config(agent_env: AgentEnv, **issuers: str) -> None:
    """A config file with one profile per keyword: ``profile=issuer``."""
    agent_env.config.parent.mkdir(parents=True, exist_ok=True)
    lines = ["storage: auto", "profiles:"]
    for profile, issuer in issuers.items():
        lines += [f"  {profile}:", f"    issuer: {issuer}", f"    scopes: {SCOPES}"]
    agent_env.config.write_text("\n".join(lines) + "\n")


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    with run_fake_provider_in_thread() as (_, provider):
        yield provider


def start_login(agent_env: AgentEnv, *args: str, **env: str) -> tuple[subprocess.Popen[str], str]:
    """`compozy login --no-browser ...`, up to the URL it prints; (process, URL)."""
    proc = subprocess.Popen([*CLI, "login", "--no-browser", *args], env=agent_env.env(**env),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("  http"):
            return proc, line.strip()
    proc.wait(30)
    raise AssertionError(f"the CLI printed no login URL (exit {proc.returncode})")


def finish(proc: subprocess.Popen[str], agent_env: AgentEnv) -> str:
    """Wait for the CLI; the rest of its stderr (also kept for the canary check)."""
    _, rest = proc.communicate(timeout=60)
    agent_env.outputs.append(("stderr of `compozy login`", rest))
    return rest


def state_and_port(url: str) -> tuple[str, int]:
    query = parse_qs(urlsplit(url).query)
    port = urlsplit(query["redirect_uri"][0]).port
    assert port is not None
    return query["state"][0], port


# ---------------------------------------------------------------- item 5: the browser's argv


@pytest.mark.real_provider
def test_the_browser_is_never_given_the_state_or_the_port_in_its_argv(
    agent_env: AgentEnv, oidc_provider: OidcTestProvider, tmp_path: Path
) -> None:
    """`compozy login` hands the browser a private page that redirects, not the URL:
    /proc/<pid>/cmdline is readable by every user, and the URL's state and port would let
    another user finish the login with their own account (login CSRF)."""
    configure(agent_env, oidc_provider)
    recorded = tmp_path / "browser-argv"
    page_copy = tmp_path / "page"
    browser = tmp_path / "browser"
    # A "browser" that records its argv and what it was asked to open, as a browser would.
    browser.write_text(
        "#!/bin/sh\n"
        f"printf '%s\\n' \"$0\" \"$@\" > {recorded}\n"
        f"url=\"$1\"; path=\"${{url#file://}}\"\n"
        f"stat -c '%a %U' \"$path\" \"$(dirname \"$path\")\" > {tmp_path}/modes\n"
        f"cat \"$path\" > {page_copy}\n"
    )
    browser.chmod(0o755)
    agent = start_agent(agent_env)
    proc = subprocess.Popen([*CLI, "login"], env=agent_env.env(BROWSER=f"{browser} %s"),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        with reaped(proc):
            assert proc.stderr is not None
            shown = ""
            for line in proc.stderr:
                shown += line
                if line.startswith("  http"):
                    break
            assert "Opening your browser" in shown
            url = shown.splitlines()[-1].strip()  # on the person's own terminal: fine
            state, port = state_and_port(url)
            secrets = (state, f"127.0.0.1:{port}", f"127.0.0.1%3A{port}")

            argv = recorded.read_text().splitlines()
            assert len(argv) == 2 and argv[1].startswith("file://"), argv
            assert not any(secret in arg for secret in secrets for arg in argv), argv
            page_path = Path(unquote(argv[1].removeprefix("file://")))
            assert page_path.exists()
            me = pwd.getpwuid(os.getuid()).pw_name
            assert (tmp_path / "modes").read_text().split() == ["600", me, "700", me]
            assert page_path.parent.parent == agent_env.root / "run"  # the runtime dir
            # Every process of the machine, while the login is pending.
            for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
                try:
                    text = cmdline.read_bytes().decode(errors="replace")
                except OSError:
                    continue
                assert not any(secret in text for secret in secrets), cmdline

            # The page sends the browser on to the authorization URL (both ways).
            page = page_copy.read_text()
            assert f'content="0; url={url.replace("&", "&amp;")}"' in page
            script = json.dumps(url).replace("&", "\\u0026")
            assert f"window.location.replace({script})" in page
            refresh = re.search(r'content="0; url=([^"]+)"', page)
            assert refresh is not None
            callback = complete_browser_login(refresh.group(1).replace("&amp;", "&"))
            assert httpx.get(callback, timeout=30).status_code == 200
            rest = finish(proc, agent_env)
            assert proc.returncode == 0, rest + agent.log()
            assert "Logged in to" in rest
            assert not page_path.exists() and not page_path.parent.exists()
    finally:
        agent.stop()


# ---------------------------------------------------------------- item 5: another uid


@pytest.mark.real_provider
def test_a_callback_from_another_user_is_refused_and_the_login_still_completes(
    agent_env: AgentEnv, oidc_provider: OidcTestProvider
) -> None:
    """Another user learned the state and port: their callback (a code of their own
    account) is refused with 403 and the login stays pending for the real one."""
    configure(agent_env, oidc_provider)
    agent = start_agent(agent_env)
    try:
        proc, url = start_login(agent_env)
        with reaped(proc):
            state, port = state_and_port(url)
            forged = f"http://127.0.0.1:{port}/callback?code=attackers-code&state={state}"
            assert get_as_another_user(forged) == 403
            assert agent.wait_for_log("refused a login callback from a socket of uid 65534")
            callback = complete_browser_login(url)
            assert httpx.get(callback, timeout=30).status_code == 200
            rest = finish(proc, agent_env)
            assert proc.returncode == 0, rest + agent.log()
            assert "as alice@example.test" in rest
    finally:
        agent.stop()


# ---------------------------------------------------------------- item 5: mix-up


@pytest.mark.real_provider
def test_a_mix_up_through_a_malicious_issuer_exchanges_no_code(
    agent_env: AgentEnv, oidc_provider: OidcTestProvider, fake: FakeProvider
) -> None:
    """RFC 9207. Profile `evil` names a malicious issuer, which sends the person's browser
    on to the honest provider with the agent's own request. The person logs in there; the
    honest code comes back to the login the agent started with the attacker. Refused, so
    the code and the PKCE verifier are sent to nobody."""
    write_config(agent_env, default=oidc_provider.issuer, evil=fake.issuer)
    fake.relay_authorization_to = oidc_provider.authorization_endpoint
    agent = start_agent(agent_env)
    try:
        tokens_before = oidc_provider.count("token")
        proc, url = start_login(agent_env, "--profile", "evil")
        with reaped(proc):
            relayed = httpx.get(url, timeout=30)
            assert relayed.status_code == 302
            callback = complete_browser_login(relayed.headers["location"])
            assert f"iss={oidc_provider.issuer}".replace(":", "%3A").replace("/", "%2F") \
                in callback
            page = httpx.get(callback, timeout=30)
            assert page.status_code == 400 and "another issuer" in page.text
            rest = finish(proc, agent_env)
            assert proc.returncode == 1
            assert "another issuer" in rest and "no code was exchanged" in rest
        assert fake.requests_to(TOKEN) == []
        assert oidc_provider.count("token") == tokens_before
        document = json.loads(run_cli(agent_env, "auth", "list", "--json").stdout)
        assert document["sessions"] == []
    finally:
        agent.stop()


# ---------------------------------------------------------------- item 11: provider text

FORGED_LINE = "2026-01-01 00:00:00,000 INFO compozy_agent.sessions[1]: forged line"
HOSTILE = f"sorry\n{FORGED_LINE}\x1b[2J\x1b]0;owned\x07\u202etxt.exe\r\x85\x7f"


def _no_forgery(text: str, where: str) -> None:
    assert not any(line.startswith("2026-01-01") for line in text.splitlines()), where
    for raw in ("\x1b", "\u202e", "\r", "\x85", "\x7f", "\x07"):
        assert raw not in text, f"{raw!r} reached {where}"


@pytest.mark.parametrize("where", ["callback-error", "token-error", "account", "device-code"])
def test_provider_text_forges_no_log_line_and_drives_no_terminal(
    agent_env: AgentEnv, fake: FakeProvider, where: str
) -> None:
    """Provider text with a newline and a fake log line, escape sequences (clear screen,
    window title), a bidi override, CR, C1 and DEL: the agent's log and the CLI's stderr
    get it escaped on one line."""
    write_config(agent_env, default=fake.issuer)
    match where:
        case "callback-error":
            fake.callback_overrides = {"code": None, "error": "access_denied",
                                       "error_description": HOSTILE}
        case "token-error":
            fake.then(Behaviour("error", error="invalid_grant", error_description=HOSTILE))
        case "account":
            fake.claims = {**fake.claims, "email": f"alice@example.test\n{HOSTILE}"}
        case "device-code":
            fake.user_code = f"WDJB\n{HOSTILE}"
    agent = start_agent(agent_env)
    try:
        if where == "device-code":
            proc = subprocess.Popen([*CLI, "login", "--device"], env=agent_env.env(),
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            with reaped(proc):
                stderr = finish(proc, agent_env)  # the fake approves at the first poll
        else:
            proc, url = start_login(agent_env)
            with reaped(proc):
                httpx.get(url, timeout=30, follow_redirects=True)
                stderr = finish(proc, agent_env)
        expected_exit = 0 if where in ("account", "device-code") else 1
        assert proc.returncode == expected_exit, stderr + agent.log()
        assert "forged line" in stderr and "\\x1b[2J" in stderr  # shown, escaped
        assert "forged line" in agent.log() or where == "device-code"
        _no_forgery(agent.log(), "the agent's log")
        _no_forgery(stderr, "the CLI's stderr")
        if where != "device-code":
            _no_forgery(run_cli(agent_env, "auth", "status").stdout, "status")
    finally:
        agent.stop()


def test_granted_scopes_from_the_provider_drive_no_terminal(
    agent_env: AgentEnv, fake: FakeProvider
) -> None:
    """The token response's `scope` is provider text too: a "scope" carrying clear-screen
    and window-title sequences, a bidi override and DEL was printed raw by `auth status`
    and `auth list`. Scopes outside RFC 6749's grammar are not taken as granted."""
    write_config(agent_env, default=fake.issuer)
    hostile_scope = "openid \x1b[2J\x1b]0;owned\x07 email\u202etxt.exe x\x7fy z\x9b31m"
    fake.then(Behaviour.ok(scope=hostile_scope))
    agent = start_agent(agent_env)
    try:
        proc, url = start_login(agent_env)
        with reaped(proc):
            httpx.get(url, timeout=30, follow_redirects=True)
            stderr = finish(proc, agent_env)
        assert proc.returncode == 0, stderr + agent.log()
        status = run_cli(agent_env, "auth", "status").stdout
        listing = run_cli(agent_env, "auth", "list").stdout
        document = json.loads(run_cli(agent_env, "auth", "list", "--json").stdout)
        for text, where in ((status, "status"), (listing, "list")):
            _no_forgery(text, where)
            assert "\x9b" not in text, where
        assert "Scopes: openid" in status
        assert document["sessions"][0]["scopes"] == ["openid"]
    finally:
        agent.stop()


# ---------------------------------------------------------------- item 10: bounded logins


def agent_tcp_listeners(pid: int) -> int:
    """TCP sockets of process ``pid`` in the LISTEN state (its loopback listeners)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    listening = 0
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                listening += 1
    return listening


class Connection:
    """One client connection to the agent's socket, kept open across requests."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(path)
        self.reader = self.sock.makefile("rb")

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        answer: dict[str, Any] = json.loads(self.reader.readline())
        return answer

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def login_start(connection: Connection, issuer: str, profile: str) -> dict[str, Any]:
    return connection.ask({"id": 1, "op": "login_start", "flow": "browser", "issuer": issuer,
                           "profile": profile})


def test_hundreds_of_login_starts_hold_few_listeners_and_the_agent_lives(
    agent_env: AgentEnv, fake: FakeProvider
) -> None:
    """400 login_start requests once opened 400 loopback listeners (600 s each) and, under
    `ulimit -n 300`, killed the agent. Now: one login per profile, at most MAX_LOGINS."""
    import resource

    agent = start_agent(agent_env)
    try:
        resource.prlimit(agent.pid, resource.RLIMIT_NOFILE, (300, 300))
        one = Connection(agent.socket)
        for _ in range(400):  # one profile, again and again: each replaces the last
            assert login_start(one, fake.issuer, "default")["ok"] is True
        assert agent_tcp_listeners(agent.pid) <= 1 + 1  # the last, and one still closing
        answers = [login_start(one, fake.issuer, f"p{n}") for n in range(400)]
        busy = [a for a in answers if not a["ok"]]
        assert len(busy) == 400 - (MAX_LOGINS - 1)
        assert {a["error"]["code"] for a in busy} == {"busy"}
        assert "logins are already in progress" in busy[0]["error"]["message"]
        assert agent.wait_for_log("stopped listening on", count=399)  # the replaced ones
        assert agent_tcp_listeners(agent.pid) == MAX_LOGINS
        many = [Connection(agent.socket) for _ in range(100)]
        answers = [login_start(c, fake.issuer, f"q{n}") for n, c in enumerate(many)]
        assert all(a["error"]["code"] == "busy" for a in answers)
        assert agent_tcp_listeners(agent.pid) == MAX_LOGINS
        one.close()  # its logins end with it
        assert agent.wait_for_log("stopped listening on", count=399 + MAX_LOGINS)
        assert agent_tcp_listeners(agent.pid) == 0
        answers = [login_start(c, fake.issuer, f"q{n}") for n, c in enumerate(many)]
        assert sum(a["ok"] for a in answers) == MAX_LOGINS
        for connection in many:
            connection.close()
        assert agent.wait_for_log("stopped listening on", count=399 + 2 * MAX_LOGINS)
        assert agent_tcp_listeners(agent.pid) == 0
        assert agent.proc.poll() is None
        assert ask(agent.socket, {"id": 1, "op": "hello"})["ok"] is True
    finally:
        agent.stop()


def test_a_login_ends_when_the_connection_that_started_it_closes(
    agent_env: AgentEnv, fake: FakeProvider
) -> None:
    agent = start_agent(agent_env)
    try:
        connection = Connection(agent.socket)
        started = login_start(connection, fake.issuer, "default")
        assert started["ok"] is True, started
        _, port = state_and_port(started["result"]["authorization_url"])
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # listening
        connection.close()
        assert agent.wait_for_log(f"stopped listening on 127.0.0.1:{port}")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        assert agent_tcp_listeners(agent.pid) == 0
    finally:
        agent.stop()


@pytest.mark.real_provider
def test_a_second_login_for_the_same_profile_replaces_the_first(
    agent_env: AgentEnv, oidc_provider: OidcTestProvider
) -> None:
    """Two terminals run `compozy login`: the first is told it was replaced, its port
    closes, and the second completes."""
    configure(agent_env, oidc_provider)
    agent = start_agent(agent_env)
    try:
        first, first_url = start_login(agent_env)
        with reaped(first):
            second, second_url = start_login(agent_env)
            with reaped(second):
                rest = finish(first, agent_env)
                assert first.returncode == 1
                assert "a newer login for profile 'default' replaced this one" in rest
                _, port = state_and_port(first_url)
                assert agent.wait_for_log(f"stopped listening on 127.0.0.1:{port}")
                with pytest.raises(httpx.ConnectError):
                    httpx.get(f"http://127.0.0.1:{port}/callback", timeout=5)
                callback = complete_browser_login(second_url)
                assert httpx.get(callback, timeout=30).status_code == 200
                rest = finish(second, agent_env)
                assert second.returncode == 0, rest
    finally:
        agent.stop()


def test_a_device_login_is_unaffected_by_the_connection_rule(
    agent_env: AgentEnv, oidc_provider: OidcTestProvider
) -> None:
    """The CLI waits on the connection that started the login: a device login, which
    waits out polling intervals, still completes."""
    configure(agent_env, oidc_provider)
    agent = start_agent(agent_env)
    try:
        proc = subprocess.Popen([*CLI, "login", "--device"], env=agent_env.env(),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        with reaped(proc):
            assert proc.stderr is not None
            for line in proc.stderr:
                found = re.search(r"or open: (\S+)", line)
                if found:
                    approve_device(found.group(1))
                    break
            rest = finish(proc, agent_env)
            assert proc.returncode == 0, rest + agent.log()
    finally:
        agent.stop()


def test_the_launch_page_is_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The page handed to the browser: a 0700 directory of its own, a 0600 file, the URL
    escaped for HTML and for the script."""
    from compozy_client.commands import login as cli

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    directory = cli._browser_launcher("https://id.example.test/auth?state=s&x=<>\"'")
    assert directory is not None and Path(directory).parent == tmp_path
    page = Path(directory) / cli.LAUNCH_PAGE_NAME
    assert stat.S_IMODE(Path(directory).stat().st_mode) == 0o700
    assert stat.S_IMODE(page.stat().st_mode) == 0o600
    text = page.read_text()
    assert "<>" not in text and "&lt;&gt;&quot;&#x27;" in text and "\\u003c\\u003e" in text
    assert cli._browser_launcher("javascript:alert(1)") is None
