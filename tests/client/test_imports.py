"""The client stays light: what each entry point loads, and the public API."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import compozy_client

# cryptography and joserfc: DPoP keys and proofs (RFC 9449) stay in the agent.
HEAVY = ("httpx", "requests", "aiohttp", "anyio", "keyring", "platformdirs", "compozy_agent",
         "cryptography", "joserfc")


def modules_after(code: str, env: dict[str, str] | None = None) -> set[str]:
    """The modules a fresh interpreter has loaded after running ``code``."""
    script = code + "\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env
    ).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_importing_the_package_loads_nothing_heavy() -> None:
    loaded = modules_after("import compozy_client")
    assert not {m for m in loaded if m.split(".")[0] in (*HEAVY, "msgspec", "yaml")}


def test_the_full_cli_never_loads_agent_dependencies() -> None:
    loaded = modules_after(
        "from compozy_client import cli, api, connection, chain, config, protocol, dpop\n"
        "cli.build_parser()"
    )
    assert not {m for m in loaded if m.split(".")[0] in HEAVY}


def test_each_http_adapter_loads_only_its_own_http_library() -> None:
    """compozy_client.httpx and compozy_client.requests are optional (extras): the part they
    share loads neither library, and each loads only its own (and no agent dependency)."""
    shared = modules_after("from compozy_client import httpauth")
    assert not {m for m in shared if m.split(".")[0] in HEAVY}
    for adapter, library in (("httpx", "httpx"), ("requests", "requests")):
        loaded = modules_after(f"from compozy_client.{adapter} import CompozyAuth")
        assert library in loaded
        assert not {m for m in loaded if m.split(".")[0] in HEAVY and m.split(".")[0] != library}


def test_token_fast_path_loads_no_argparse_msgspec_or_yaml(tmp_path: object) -> None:
    # No agent answers here, so the fast path gives up; what matters is what it loaded.
    code = (
        "import os\n"
        "os.environ['COMPOZY_AGENT_SOCK'] = '/nonexistent/agent.sock'\n"
        "os.environ['COMPOZY_AGENT_AUTOSTART'] = '0'\n"
        "from compozy_client import fasttoken\n"
        "assert fasttoken.run(['--profile', 'dev']) is None\n"
    )
    loaded = modules_after(code)
    assert not {m for m in loaded if m.split(".")[0] in (*HEAVY, "msgspec", "yaml", "argparse")}


def test_fast_path_with_env_key_prints_it() -> None:
    code = (
        "import os\n"
        "os.environ['FLYZT_API_KEY'] = 'env-key'\n"
        "from compozy_client import fasttoken\n"
        "assert fasttoken.run([]) == 0\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout == "env-key\n"


def test_public_api_is_exactly_all() -> None:
    assert sorted(compozy_client.__all__) == [
        "AgentError", "AgentUnavailable", "CompozyError", "NotLoggedIn", "__version__",
        "async_get_token", "get_token",
    ]
    for name in compozy_client.__all__:
        assert getattr(compozy_client, name) is not None
    assert dir(compozy_client) == sorted(compozy_client.__all__)


def _launcher_token_imports(tmp_path: Path, **env: str) -> set[str]:
    """What the `compozy` launcher imports for `compozy auth token` against an answering
    agent (``python -X importtime``); the command must print the agent's token."""
    path = str(tmp_path / "agent.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    reply = b'{"id":1,"ok":true,"result":{"access_token":"tok-123","expires_at":1.0}}\n'

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            conn.makefile("rb").readline()
            conn.sendall(reply)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    launcher = Path(__file__).resolve().parents[2] / "client" / "bin" / "compozy"
    env = {"COMPOZY_AGENT_SOCK": path, "HOME": str(tmp_path), "PATH": "/usr/bin", **env}
    result = subprocess.run([sys.executable, "-X", "importtime", str(launcher), "auth", "token"],
                            capture_output=True, text=True, env=env, timeout=30)
    thread.join(10)
    server.close()
    assert result.returncode == 0 and result.stdout == "tok-123\n", result.stderr[-2000:]
    return {line.split("|")[-1].strip() for line in result.stderr.splitlines()
            if line.startswith("import time:")}


def test_the_compozy_launcher_token_path_imports_only_what_it_needs(tmp_path: Path) -> None:
    """`compozy auth token` against an answering agent: the whole process's imports."""
    imported = _launcher_token_imports(tmp_path)
    expensive = {"re", "enum", "typing", "json", "argparse", "socket", "msgspec", "yaml",
                 "pathlib", "subprocess", *HEAVY}
    assert imported & expensive == set()
    assert {"compozy_client.fasttoken", "_socket"} <= imported


def test_the_compozy_launcher_tries_the_fast_path_before_importing_the_cli(
    tmp_path: Path,
) -> None:
    """Without cached bytecode, compiling cli.py costs the token path dearly (issue 15,
    item 6): the launcher answers `auth token` without importing it."""
    imported = _launcher_token_imports(tmp_path, PYTHONDONTWRITEBYTECODE="1")
    assert "compozy_client.fasttoken" in imported
    assert "compozy_client.cli" not in imported
    assert not {m for m in imported if m.startswith("compozy_client.commands")}


def test_the_compozy_launcher_falls_back_to_the_full_cli(tmp_path: Path) -> None:
    """An unusual flag is not the fast path's: the full CLI answers, as before."""
    launcher = Path(__file__).resolve().parents[2] / "client" / "bin" / "compozy"
    env = {"COMPOZY_AGENT_SOCK": str(tmp_path / "none.sock"), "HOME": str(tmp_path),
           "PATH": "/usr/bin", "COMPOZY_AGENT_AUTOSTART": "0"}
    result = subprocess.run([sys.executable, str(launcher), "auth", "token", "--no-such-flag"],
                            capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 2 and "unrecognized arguments: --no-such-flag" in result.stderr
    version = subprocess.run([sys.executable, str(launcher), "--version"],
                             capture_output=True, text=True, env=env, timeout=30)
    assert version.returncode == 0 and version.stdout.startswith("compozy ")


def test_an_adapter_without_its_library_says_which_extra_to_install() -> None:
    for adapter in ("httpx", "requests"):
        code = (f"import sys\nsys.modules[{adapter!r}] = None  # as if not installed\n"
                f"import compozy_client.{adapter}\n")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert result.returncode == 1
        assert f"ModuleNotFoundError: compozy_client.{adapter} needs {adapter}: " \
               f"pip install 'compozy-agent[{adapter}]'" in result.stderr
