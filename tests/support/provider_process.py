"""What both real test providers share: a child process whose stdout is its event log.

Each provider (node oidc-provider in ``provider.py``, django-oauth-toolkit in
``dot_provider.py``) writes one JSON object per line, never a token value:
``ready`` first, then one line per request it served, numbered by ``seq``. A
background thread reads them; :meth:`ProviderProcess.events` and the counts
first ask the provider how many lines it has written (``/__test__/seq``) and
wait until all of them are read, so a count taken after a call returned
includes that call. A line's ``secrets`` (the values the provider handed out)
go to the canary check, not into the log.
"""

from __future__ import annotations

import collections
import json
import subprocess
import threading
from types import TracebackType
from typing import Any, Self

import httpx
import pytest

from support import canary


class ProviderProcess:
    #: How a start-up failure names the provider.
    description = "the test provider"
    #: The provider's issuer, from its ``ready`` line (set by the subclass).
    issuer: str

    def _start_reading(self, proc: subprocess.Popen[bytes], ready_timeout: float,
                       stderr_lines: int = 40) -> dict[str, Any]:
        """Read ``proc``'s output from now on; its ``ready`` line, or fail the test."""
        self.proc = proc
        self._events: list[dict[str, Any]] = []
        self._seen_seq = 0
        self._arrived = threading.Condition()
        self._ended = False
        self._stderr: collections.deque[str] = collections.deque(maxlen=stderr_lines)
        self._reader = threading.Thread(target=self._read_events, daemon=True)
        self._reader.start()
        self._errors = threading.Thread(target=self._read_stderr, daemon=True)
        self._errors.start()
        with self._arrived:
            self._arrived.wait_for(lambda: self._ready() is not None or self._ended,
                                   ready_timeout)
        ready = self._ready()
        if ready is None:
            self.stop()
            pytest.fail(f"{self.description} did not start within {ready_timeout:.0f} s; "
                        f"its stderr ended with:\n{self.stderr()}")
        return ready

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        issuer = getattr(self, "issuer", "(starting)")
        return f"<{type(self).__name__} {issuer} pid={self.proc.pid}>"

    def url(self, path: str) -> str:
        """``path`` under the provider's issuer."""
        return f"{self.issuer}{path}"

    @property
    def seq_url(self) -> str:
        """Where the provider says how many event lines it has written."""
        raise NotImplementedError

    # -- the event log ---------------------------------------------------------

    def _ready(self) -> dict[str, Any] | None:
        return next((e for e in self._events if e.get("event") == "ready"), None)

    def _read_events(self) -> None:
        assert self.proc.stdout is not None
        try:
            for raw in self.proc.stdout:
                try:
                    event = json.loads(raw)
                except ValueError:
                    continue
                if not isinstance(event, dict):
                    continue
                secrets = event.pop("secrets", None)
                if isinstance(secrets, list):
                    canary.remember(secrets)
                with self._arrived:
                    self._events.append(event)
                    if isinstance(event.get("seq"), int):
                        self._seen_seq = max(self._seen_seq, event["seq"])
                    self._arrived.notify_all()
        finally:
            with self._arrived:
                self._ended = True
                self._arrived.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self._stderr.append(raw.decode(errors="replace").rstrip())

    def stderr(self) -> str:
        """The last lines the provider wrote to stderr (its warnings and crashes)."""
        return "\n".join(self._stderr)

    def _catch_up(self, timeout: float = 10.0) -> None:
        """Wait until every line the provider has written so far has been read."""
        if self.proc.poll() is None:
            try:
                written = int(httpx.get(self.seq_url, timeout=timeout).json()["seq"])
            except (httpx.HTTPError, ValueError, KeyError):
                written = None  # stopping or stopped: the reader ends at EOF
            if written is not None:
                with self._arrived:
                    self._arrived.wait_for(
                        lambda: self._seen_seq >= written or self._ended, timeout)
                return
        self._reader.join(timeout)

    def events(self, event: str | None = None, **match: Any) -> list[dict[str, Any]]:
        """The provider's event lines so far, optionally only those of a kind and fields."""
        self._catch_up()
        with self._arrived:
            return [e for e in self._events if _matches(e, event, match)]

    def count(self, event: str = "token", **match: Any) -> int:
        """How many events of this kind (and with these field values) happened so far."""
        return len(self.events(event, **match))

    def count_token_calls(self, grant_type: str | None = None, **match: Any) -> int:
        """Calls to the token endpoint so far, of one grant type if given (any status,
        unless ``status=200`` or similar is passed)."""
        if grant_type is not None:
            match["grant_type"] = grant_type
        return self.count("token", **match)

    def wait_for(self, event: str, count: int, timeout: float = 30.0, **match: Any) -> bool:
        """Block until the provider has logged ``count`` such events; False on timeout."""
        with self._arrived:
            return self._arrived.wait_for(
                lambda: sum(1 for e in self._events if _matches(e, event, match)) >= count,
                timeout)

    def stop(self) -> None:
        """Stop the provider (SIGTERM, then SIGKILL after 10 s) and reap it."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        self._errors.join(5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def _matches(event: dict[str, Any], kind: str | None, match: dict[str, Any]) -> bool:
    if kind is not None and event.get("event") != kind:
        return False
    return all(event.get(key) == value for key, value in match.items())
