"""Starting an agent: once per process and socket, whichever way the CLI took."""

from __future__ import annotations

import pytest

from compozy_client import autostart, connection


def test_an_agent_this_process_started_is_not_started_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started: list[str] = []
    now = [100.0]
    monkeypatch.setattr(autostart, "start_agent", started.append)
    monkeypatch.setattr(autostart.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(autostart, "_started", {})

    first = autostart.start_once("/run/user/1/compozy/agent.sock")
    now[0] += 1.0
    # The full CLI taking over from the fast path waits for the same agent.
    assert autostart.start_once("/run/user/1/compozy/agent.sock") == first == 100.0
    assert started == ["/run/user/1/compozy/agent.sock"]
    # Another socket is another agent; and one that never came up is tried again later.
    autostart.start_once("/tmp/other.sock")
    now[0] += autostart.AUTOSTART_TIMEOUT
    assert autostart.start_once("/run/user/1/compozy/agent.sock") == now[0]
    assert started == ["/run/user/1/compozy/agent.sock", "/tmp/other.sock",
                       "/run/user/1/compozy/agent.sock"]


def test_connect_waits_for_the_agent_the_fast_path_started(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    started: list[str] = []
    monkeypatch.setattr(autostart, "start_agent", started.append)
    monkeypatch.setattr(autostart, "_started", {})
    path = f"{tmp_path}/agent.sock"
    autostart.start_once(path)  # as the fast path does, before the full CLI loads
    with pytest.raises(connection.AgentUnavailable, match="did not answer"):
        connection.connect(path, deadline=connection.time.monotonic() + 0.05)
    assert started == [path]
