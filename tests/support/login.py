"""Logging in as a person would, for integration tests: config, device and browser logins."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from support.agent import AgentEnv
from support.provider import (
    OidcTestProvider,
    approve_device,
    complete_browser_login,
    deny_browser_login,
    deny_device,
)

CLI = [sys.executable, "-c", "from compozy_client.cli import main; main()"]
#: The other user on the machine (nobody).
NOBODY = 65534

_GET = (
    "import sys, urllib.request, urllib.error\n"
    "try:\n"
    "    status = urllib.request.urlopen(sys.argv[1], timeout=20).status\n"
    "except urllib.error.HTTPError as exc:\n"
    "    status = exc.code\n"
    "print(status)\n"
)


def get_as_another_user(url: str) -> int:
    """GET ``url`` from a process of uid 65534 (``setpriv``); the HTTP status it got.

    The attacker of a browser login is another user on the same machine who
    learned a login's ``state`` and loopback port.
    """
    return int(run_python_as_another_user(_GET, url))


def run_python_as_another_user(script: str, *args: str) -> str:
    """Run ``script`` in a system python3 as uid 65534 (``setpriv``); what it printed."""
    if os.getuid() != 0:
        pytest.skip("needs root to act as another user (uid 65534, nobody)")
    python = shutil.which("python3", path="/usr/bin:/bin")
    setpriv = shutil.which("setpriv", path="/usr/bin:/bin")
    if python is None or setpriv is None:
        pytest.skip("needs setpriv and a system python3 that uid 65534 may run")
    out = subprocess.run(
        [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         python, "-c", script, *args],
        capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin"}, cwd="/",
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def configure(
    agent_env: AgentEnv, provider: OidcTestProvider, *profiles: str, storage: str = "auto",
    client_id: str | None = None, token_binding: str | None = None,
) -> None:
    """A config file pointing every profile at the test provider, asking for its API;
    ``client_id`` and ``token_binding`` (RFC 9449) for each profile when given."""
    agent_env.config.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"storage: {storage}", "profiles:"]
    for profile in profiles or ("default",):
        lines += [
            f"  {profile}:",
            f"    issuer: {provider.issuer}",
            "    scopes: [openid, profile, email, offline_access, compozy:read, compozy:write]",
            f"    resources: [{provider.api}]",
            *([f"    client_id: {client_id}"] if client_id else []),
            *([f"    token_binding: {token_binding}"] if token_binding else []),
        ]
    agent_env.config.write_text("\n".join(lines) + "\n")


@contextlib.contextmanager
def reaped(proc: subprocess.Popen[str]) -> Iterator[None]:
    """Whatever happens in the block, the CLI process does not outlive it."""
    try:
        yield
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        proc.wait()


def login_device(
    agent_env: AgentEnv, *args: str, person: str = "alice", deny: bool = False, **env: str
) -> subprocess.CompletedProcess[str]:
    """`compozy login --device`, with the person approving (or denying) on the provider's pages."""
    proc = subprocess.Popen(
        [*CLI, "login", "--device", *args],
        env=agent_env.env(**env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with reaped(proc):
        assert proc.stderr is not None
        shown = []
        for line in proc.stderr:
            shown.append(line)
            found = re.search(r"or open: (\S+)", line)
            if found:
                if deny:
                    deny_device(found.group(1))
                else:
                    approve_device(found.group(1), login=person)
                break
        stdout, rest = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, "".join(shown) + rest)


def login_browser(
    agent_env: AgentEnv, *args: str, deny: bool = False, **env: str
) -> subprocess.CompletedProcess[str]:
    """`compozy login --no-browser`, with the person completing it and the browser
    following the redirect to the agent's loopback listener."""
    proc = subprocess.Popen(
        [*CLI, "login", "--no-browser", *args],
        env=agent_env.env(**env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with reaped(proc):
        assert proc.stderr is not None
        shown = []
        for line in proc.stderr:
            shown.append(line)
            if line.startswith("  http"):
                url = line.strip()
                callback = deny_browser_login(url) if deny else complete_browser_login(url)
                page = httpx.get(callback, timeout=30)
                shown.append(f"[callback page {page.status_code}]\n")
                break
        stdout, rest = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, "".join(shown) + rest)
