"""The deadline budget as docs/architecture.md ("Deadlines") states it, in seconds.

Written out rather than imported from the code, so the integration tests that
measure it also run against code that predates it; tests/agent/test_deadline_budget.py
checks that the code's constants are these.
"""

from __future__ import annotations

#: compozy_client.connection.DEFAULT_TIMEOUT: the CLI's budget, from its start to its answer.
CLI_BUDGET = 30.0
#: compozy_agent.tokens.WAIT_LIMIT: the longest the agent keeps a caller waiting.
WAIT_LIMIT = 20.0
#: compozy_agent.http.CALL_DEADLINE: one exchange with the provider, body included.
CALL_DEADLINE = 10.0
#: compozy_agent.lifecycle.EARLY_RETRY_WINDOW: a caller without a token keeps the agent trying.
EARLY_RETRY_WINDOW = 5.0
#: compozy_agent.lifecycle.EXPIRY_MARGIN: a token is handed out until this long before expiry.
EXPIRY_MARGIN = 2.0
#: compozy_agent.lifecycle.EARLY_RETRY_SPACING: attempts ahead of the backoff, at most this often.
EARLY_RETRY_SPACING = 1.0
