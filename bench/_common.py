"""What every benchmark needs: an isolated home, the real test provider, a logged-in agent.

Each benchmark prints its figures as ratios against a baseline measured side
by side in the same run (these machines are noisy), and a last line
``ratio X.XX (target ...): meets|misses the target`` that the smoke tests match.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support.provider import OidcTestProvider, complete_browser_login  # noqa: E402

BINDIR = Path(sys.executable).parent


@dataclass
class Bench:
    home: Path
    env: dict[str, str]
    provider: OidcTestProvider | None

    @property
    def socket(self) -> str:
        return str(self.home / "run" / "compozy" / "agent.sock")

    def cli(self, *args: str, check: bool = True, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BINDIR / "compozy"), *args], env={**self.env, **extra},
                              capture_output=True, text=True, check=check, timeout=120)

    def agent_pid(self) -> int:
        status = self.cli("auth", "status", "--json", check=False, COMPOZY_AGENT_AUTOSTART="0")
        return int(json.loads(status.stdout)["agent"]["pid"])

    def stop_agent(self) -> None:
        with contextlib.suppress(ValueError, KeyError, TypeError, ProcessLookupError):
            pid = self.agent_pid()
            os.kill(pid, 15)
            deadline = time.monotonic() + 10
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.01)


def verdict(name: str, ratio: float, target: float, *, at_most: bool = True) -> str:
    meets = ratio <= target if at_most else ratio >= target
    sign = "<=" if at_most else ">="
    return (f"{name}ratio {ratio:.2f} (target {sign} {target:g}): "
            f"{'meets' if meets else 'misses'} the target")


@contextlib.contextmanager
def bench_home(*, provider: bool = True, storage: str = "memory",
               provider_args: dict[str, object] | None = None) -> Iterator[Bench]:
    """A temporary home with its own agent socket and state dir (and the test provider)."""
    home = Path(tempfile.mkdtemp(prefix="compozy-bench-"))
    (home / "run").mkdir(mode=0o700)
    env = {
        **{k: v for k, v in os.environ.items()
           if not k.startswith(("COMPOZY_", "FLYZT_")) and k != "PYTHONDONTWRITEBYTECODE"},
        "HOME": str(home), "XDG_RUNTIME_DIR": str(home / "run"),
        "COMPOZY_STATE_DIR": str(home / "state"),
        "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring",
        "PATH": f"{BINDIR}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    (home / ".compozy").mkdir()
    (home / ".compozy" / "config.yaml").write_text(f"storage: {storage}\n")
    # Compiled modules, as an installed package has them.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "client"),
                    str(ROOT / "agent")], check=True, env=env, stdout=subprocess.DEVNULL)
    started = OidcTestProvider.start(**(provider_args or {})) if provider else None
    bench = Bench(home, env, started)
    try:
        if started is not None:
            env["COMPOZY_ISSUER"] = started.issuer
        yield bench
    finally:
        bench.cli("logout", "--all", "--force", check=False, COMPOZY_AGENT_AUTOSTART="0")
        bench.stop_agent()
        if started is not None:
            started.stop()
        shutil.rmtree(home, ignore_errors=True)


def login(bench: Bench, *args: str) -> None:
    """`compozy login --no-browser`, the person completing it on the provider's pages."""
    import httpx

    proc = subprocess.Popen([str(BINDIR / "compozy"), "login", "--no-browser", *args],
                            env=bench.env, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("  http"):
            httpx.get(complete_browser_login(line.strip()), timeout=30)
            break
    _, rest = proc.communicate(timeout=60)
    if proc.returncode != 0:
        raise SystemExit(f"login failed: {rest}")


def read_line(sock: socket.socket, buffer: bytearray) -> bytes:
    """One response line from ``sock`` (bytes after it stay in ``buffer``)."""
    while True:
        end = buffer.find(b"\n")
        if end >= 0:
            line = bytes(buffer[:end])
            del buffer[:end + 1]
            return line
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buffer += chunk


def seed_sessions(bench: Bench, issuer: str, count: int) -> None:
    """Write ``count`` sessions of ``issuer`` straight into the state and (opt-in, plaintext)
    secrets files, as an agent would have left them; the next agent restores them.

    Needs ``storage: file`` (see bench_home). Profile ``default`` is the first.
    """
    state = bench.home / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    now = time.time()
    sessions = [{"token_id": f"seed{n:05d}", "profile": "default" if n == 0 else f"p{n}",
                 "kind": "oidc", "issuer": issuer, "client_id": "compozy-cli",
                 "scopes": ["openid", "offline_access"], "created_at": now}
                for n in range(count)]
    secrets = {f"seed{n:05d}:refresh_token": f"seed-rt-{n}" for n in range(count)}
    for name, document in (("sessions.json", {"version": 1, "sessions": sessions}),
                           ("secrets.json", secrets)):
        path = state / name
        path.write_text(json.dumps(document))
        path.chmod(0o600)


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def context_switches(pid: int) -> dict[int, int]:
    """Voluntary and involuntary context switches of each thread of ``pid``, by thread id."""
    counts = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total = 0
            for line in (task / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    total += int(line.split()[1])
            counts[int(task.name)] = total
    return counts


def switches_between(before: dict[int, int], after: dict[int, int]) -> int:
    """Context switches from ``before`` to ``after`` of the threads alive at the end
    (a thread that exited in between is not counted: wait for idle threads to exit)."""
    return sum(count - before.get(tid, 0) for tid, count in after.items())
