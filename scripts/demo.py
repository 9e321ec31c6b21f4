"""The README's main job: provider, agent, login, token. Run it with scripts/demo."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support.provider import OidcTestProvider, approve_device  # noqa: E402


def step(text: str) -> None:
    print(
        f"\n\033[1m== {text}\033[0m"
        if sys.stdout.isatty() and not os.environ.get("NO_COLOR")
        else f"\n== {text}",
        flush=True,
    )


def main() -> int:
    home = Path(tempfile.mkdtemp(prefix="compozy-demo-"))
    runtime = home / "run"
    runtime.mkdir(mode=0o700)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("COMPOZY_", "FLYZT_"))},
        "HOME": str(home),
        "XDG_RUNTIME_DIR": str(runtime),
        "XDG_STATE_HOME": str(home / "state"),
        "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    provider = OidcTestProvider.start()
    try:
        step(f"A local OpenID provider stands in for Compozy Cloud: {provider.issuer}")
        config = home / ".compozy" / "config.yaml"
        config.parent.mkdir()
        config.write_text(
            "storage: memory   # the demo never writes to your keyring\n"
            "profiles:\n  default:\n"
            f"    issuer: {provider.issuer}\n"
            "    scopes: [openid, profile, email, offline_access, compozy:read, compozy:write]\n"
            f"    resources: [{provider.api}]\n"
        )
        print(f"$ cat ~/.compozy/config.yaml\n{config.read_text()}", end="")

        step("compozy auth status  (no agent runs yet: the CLI starts one)")
        subprocess.run(["compozy", "auth", "status"], env=env)

        step("compozy login --device  (the person approves on the provider's page)")
        login = subprocess.Popen(
            ["compozy", "login", "--device"], env=env, stderr=subprocess.PIPE, text=True
        )
        assert login.stderr is not None
        for line in login.stderr:
            sys.stdout.write(line)
            found = re.search(r"or open: (\S+)", line)
            if found:
                print(f"   [the person opens {found.group(1)}, signs in as alice and approves]")
                approve_device(found.group(1))
                break
        sys.stdout.write(login.stderr.read())
        if login.wait() != 0:
            print("login failed", file=sys.stderr)
            return 1

        step("compozy auth status")
        subprocess.run(["compozy", "auth", "status"], env=env, check=True)

        step("compozy auth list")
        subprocess.run(["compozy", "auth", "list"], env=env, check=True)

        step("compozy auth token  (what a script puts in its Authorization header)")
        token = subprocess.run(
            ["compozy", "auth", "token"], env=env, check=True, capture_output=True, text=True
        ).stdout.strip()
        print(f"{token[:12]}...{token[-6:]}  ({len(token)} characters)")

        step("compozy auth token --audience https://api.compozy.dev --scope compozy:read")
        narrow = subprocess.run(
            ["compozy", "auth", "token", "--audience", provider.api, "--scope", "compozy:read"],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        print(f"{narrow[:12]}...  (a JWT for the API, only compozy:read)")

        step("compozy auth refresh")
        subprocess.run(["compozy", "auth", "refresh"], env=env, check=True)

        step("compozy auth log  (who got tokens: as the kernel reports the caller)")
        subprocess.run(["compozy", "auth", "log", "--limit", "3"], env=env, check=True)

        step("compozy logout")
        subprocess.run(["compozy", "logout"], env=env, check=True)
        print(
            f"\nProvider calls: {provider.count('token')} to the token endpoint, "
            f"{provider.count('revocation')} revocation(s)."
        )
        return 0
    finally:
        _stop_agent(env)
        provider.stop()
        shutil.rmtree(home, ignore_errors=True)


def _stop_agent(env: dict[str, str]) -> None:
    """Stop the agent the CLI started, found through its own status answer."""
    result = subprocess.run(
        ["compozy", "auth", "status", "--json"],
        capture_output=True,
        text=True,
        env={**env, "COMPOZY_AGENT_AUTOSTART": "0"},
    )
    with contextlib.suppress(ValueError, KeyError, TypeError, ProcessLookupError):
        os.kill(int(json.loads(result.stdout)["agent"]["pid"]), signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(main())
