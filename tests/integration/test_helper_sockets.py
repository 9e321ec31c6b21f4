"""The credential helpers never send a byte to a socket another user serves, on their fast
path or on the full library's, and say so in one line.

Uses test_trust.py's listener run as uid 65534 (the attacker who got a socket into our
place), as every other client path there does.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.test_trust import NOBODY, start_relay
from support.agent import AgentEnv, prepare_dirs

BIN = Path(__file__).resolve().parents[2] / "client" / "bin"
HELPERS = {
    "kube-token": ([str(BIN / "compozy"), "auth", "kube-token"], None),
    "docker-credential-compozy get": ([str(BIN / "docker-credential-compozy"), "get"],
                                      "registry.example\n"),
    "docker-credential-compozy erase": ([str(BIN / "docker-credential-compozy"), "erase"],
                                        "registry.example\n"),
}


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="cz-shared-", dir="/tmp"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("socket_owner", ["theirs", "chowned to us"])
def test_the_credential_helpers_send_nothing_to_another_users_listener(
    agent_env: AgentEnv, shared_tmp: Path, socket_owner: str
) -> None:
    """Our own 0700 directory, but the socket in it is uid 65534's listener; chowned to
    us, only the kernel's peer credentials can tell."""
    import os

    prepare_dirs(agent_env)
    ours = Path(agent_env.socket)
    ours.parent.mkdir(mode=0o700)
    relay = start_relay(shared_tmp / "theirs" / "agent.sock")
    os.rename(relay.path, ours)
    if socket_owner == "chowned to us":
        os.chown(ours, os.getuid(), os.getgid())
    results = {}
    for name, (command, stdin) in HELPERS.items():
        done = subprocess.run([sys.executable, *command], input=stdin, capture_output=True,
                              text=True, timeout=60, env=agent_env.env())
        results[name] = done
    connections, received = relay.finish()
    assert received == 0, {n: r.stderr for n, r in results.items()}
    for name, result in results.items():
        assert result.returncode == 1, name
        assert "Traceback" not in result.stderr, name
        lines = result.stderr.splitlines()
        assert len(lines) == 1, (name, result.stderr)
        if socket_owner == "theirs":
            assert f"{ours} belongs to uid {NOBODY}" in lines[0], name
        else:
            assert f"served by a process of uid {NOBODY}" in lines[0], name
    # Chowned to us: each helper connects (fast path, then the full library) to ask the
    # kernel who listens, and sends nothing; erase gives up after its first question.
    assert connections == (0 if socket_owner == "theirs" else 2 * len(HELPERS))
    assert not (agent_env.state_dir / "agent.log").exists()
