"""The server's :class:`~compozy_agent.backend.Backend`: the session rooms put together.

Each op is answered by the room that owns it, and this module only wires them
(each room imports only those below it; none imports this one)::

    manager.py      this facade: which room answers which op
    logins.py       login_start .. login_wait, API keys: a new session handed to the driver
    revocation.py   revoke, revoke_all, logout: RFC 7009, then the driver forgets
    tokens.py       token, dpop_proof, refresh: a session's tokens, waiting on its refreshes
    sessions.py     the driver: the sessions, restore, metadata, the lifecycle's actions
    scheduler.py    when each session next needs a tick: a heap, capped sleeps
"""

from __future__ import annotations

from collections.abc import Callable

from compozy_agent.clock import Clock
from compozy_agent.endpoints import endpoints_from
from compozy_agent.http import ProviderClient
from compozy_agent.logins import Logins
from compozy_agent.revocation import Revocation
from compozy_agent.scheduler import Scheduler
from compozy_agent.sessions import Session, SessionDriver
from compozy_agent.store import SessionStore
from compozy_agent.tokens import TokenService
from compozy_client.config import Config, load_config


class SessionManager:
    """Every session of the agent and every login in progress, behind one Backend."""

    def __init__(
        self,
        store: SessionStore,
        provider: ProviderClient,
        *,
        clock: Clock | None = None,
        config_loader: Callable[[], Config] = load_config,
    ) -> None:
        self.store = store
        self.driver = driver = SessionDriver(store, provider, clock=clock,
                                             endpoints=endpoints_from(config_loader))
        self.tokens = tokens = TokenService(driver, config_loader=config_loader)
        self.revocation = revocation = Revocation(driver, provider)
        self.logins = logins = Logins(driver, revocation, provider, config_loader=config_loader)
        # Running: restore, then the scheduler, until cancelled (logins and refreshes
        # run as tasks of the driver).
        self.run = driver.run
        self.restore = driver.restore
        # The Backend's ops, each where it happens.
        self.storage_info = driver.storage_info
        self.clock_skew = driver.clock_skew
        self.warnings = driver.warnings
        self.sessions = driver.sessions
        self.token = tokens.token
        self.dpop_proof = tokens.dpop_proof
        self.refresh = tokens.refresh
        self.revoke = revocation.revoke
        self.revoke_all = revocation.revoke_all
        self.logout = revocation.logout
        self.login_start = logins.login_start
        self.login_wait = logins.login_wait
        self.login_cancel = logins.login_cancel
        self.store_api_key = logins.store_api_key
        self.connection_closed = logins.connection_closed

    @property
    def by_id(self) -> dict[str, Session]:
        """The sessions held, by token id."""
        return self.driver.by_id

    @property
    def scheduler(self) -> Scheduler[Session]:
        return self.driver.scheduler
