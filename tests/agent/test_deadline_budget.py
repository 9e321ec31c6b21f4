"""The deadline budget holds together: the agent always answers before the CLI gives up.

docs/architecture.md ("Deadlines") states the budget as one table; the
integration tests (tests/integration/test_deadlines.py) use its numbers.
"""

from __future__ import annotations

from compozy_agent import http, lifecycle, tokens
from compozy_client import connection, fasttoken
from support import budget as documented


def test_the_code_has_the_documented_budget() -> None:
    assert connection.DEFAULT_TIMEOUT == fasttoken.budget() == documented.CLI_BUDGET
    assert tokens.WAIT_LIMIT == documented.WAIT_LIMIT
    assert http.CALL_DEADLINE == documented.CALL_DEADLINE
    assert lifecycle.EARLY_RETRY_WINDOW == documented.EARLY_RETRY_WINDOW


def test_the_agent_answers_before_the_client_gives_up() -> None:
    # A caller may wait for an attempt in flight and then one early attempt of its own.
    worst_refresh = lifecycle.EARLY_RETRY_WINDOW + http.CALL_DEADLINE
    assert worst_refresh < tokens.WAIT_LIMIT
    assert tokens.WAIT_LIMIT + tokens.ANSWER_MARGIN < connection.DEFAULT_TIMEOUT
    assert http.CONNECT_TIMEOUT <= http.CALL_DEADLINE
    assert connection.AUTOSTART_TIMEOUT < connection.DEFAULT_TIMEOUT
