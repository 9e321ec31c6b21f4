"""Logins: browser, device and API keys, from ``login_start`` to a session handed to the driver.

A browser login (RFC 6749 section 4.1 with PKCE, RFC 8252) listens on a
loopback port for one callback, checks its ``state`` and RFC 9207 ``iss``,
and exchanges the code; a device login (RFC 8628) polls the token endpoint.
Either ends in :meth:`Logins.adopt`: the ID token checked (OIDC Core 3.1.3.7,
the nonce), the refresh token saved, and the new session handed to the
driver, which makes it its profile's session; the one it replaces is revoked
(``revocation.py``) and forgotten. An API key goes the same last step.

Logins are bounded: one pending login per profile (a newer one replaces it),
at most :data:`MAX_LOGINS` held at once, each ends after :data:`LOGIN_TTL`
seconds and with the connection that started it (:meth:`Logins.connection_closed`).
The flows run as tasks of the driver; ``login_wait`` collects the outcome.
"""

from __future__ import annotations

import logging
import reprlib
import secrets
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final

import anyio
import msgspec

from compozy_agent import oidc
from compozy_agent.backend import OpError
from compozy_agent.endpoints import for_issuer
from compozy_agent.http import ProviderClient
from compozy_agent.lifecycle import SessionLifecycle, usable_token
from compozy_agent.revocation import Revocation
from compozy_agent.sessions import Session, SessionDriver
from compozy_agent.store import StoredSession, StoreError
from compozy_client import protocol as p
from compozy_client.config import (
    DEFAULT_CLIENT_ID,
    DEFAULT_ISSUER,
    DEFAULT_SCOPES,
    Config,
    load_config,
)
from compozy_client.errors import ConfigError, ErrorCode
from compozy_client.safetext import one_line

if TYPE_CHECKING:
    from compozy_agent.dpop import DpopKey
    from compozy_agent.http import DpopSigner
    from compozy_agent.loopback import LoopbackRedirect

log = logging.getLogger("compozy_agent.logins")

LOGIN_TTL: Final = 600.0
#: Logins held at once (pending, or finished and not yet collected by login_wait): each
#: pending browser login holds a loopback listener, each device login a polling task.
MAX_LOGINS: Final = 8
#: The longest account name (a provider claim) shown in messages and logs.
ACCOUNT_LIMIT: Final = 200


def _new_id() -> str:
    return secrets.token_hex(4)


class Login(msgspec.Struct, eq=False):
    login_id: str
    profile: str
    issuer: str
    client_id: str
    scopes: list[str]
    resources: list[str]
    expires_at: float
    #: The connection that started it: the login ends when that connection closes.
    owner: object = None
    #: The OIDC nonce of a browser login's authentication request (OIDC Core 3.1.2.1).
    nonce: str | None = None
    done: anyio.Event = msgspec.field(default_factory=anyio.Event)
    session: Session | None = None
    error: OpError | None = None
    cancel_scope: anyio.CancelScope = msgspec.field(default_factory=anyio.CancelScope)
    #: Set once its flow has ended and let go of its listener or polling.
    released: anyio.Event = msgspec.field(default_factory=anyio.Event)
    #: ``token_binding`` as configured (bearer, dpop, auto), and the key made for this
    #: login when it asks for DPoP-bound tokens (RFC 9449); the key is saved with the
    #: session's refresh token when the login ends.
    token_binding: str = "bearer"
    dpop_key: DpopKey | None = None

    def __rich_repr__(self) -> list[tuple[str, Any]]:  # never the nonce or the DPoP key
        return [(name, getattr(self, name)) for name in _LOGIN_SHOWN]

    @reprlib.recursive_repr()
    def __repr__(self) -> str:
        return "Login(" + ", ".join(f"{name}={value!r}"
                                    for name, value in self.__rich_repr__()) + ")"

    def dpop_signer(self, now: Callable[[], float]) -> DpopSigner | None:
        key = self.dpop_key
        if key is None:
            return None
        return lambda method, url, nonce: key.proof(method, url, now(), nonce=nonce)


#: What a Login's repr shows: a field added to Login shows only once it is listed here.
_LOGIN_SHOWN: Final = ("login_id", "profile", "issuer", "client_id", "scopes", "resources",
                       "expires_at", "owner", "done", "session", "error", "cancel_scope",
                       "released", "token_binding")


class Logins(Mapping[str, Login]):
    """The logins in progress, by login id (read-only), and the flows that end them."""

    def __init__(
        self,
        driver: SessionDriver,
        revocation: Revocation,
        provider: ProviderClient,
        *,
        config_loader: Callable[[], Config] = load_config,
    ) -> None:
        self.driver = driver
        self.revocation = revocation
        self.provider = provider
        self.clock = driver.clock
        self.config_loader = config_loader
        self._held: dict[str, Login] = {}

    def __getitem__(self, login_id: str) -> Login:
        return self._held[login_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._held)

    def __len__(self) -> int:
        return len(self._held)

    def now(self) -> float:
        return self.clock.now()

    def _login_settings(
        self, request: p.LoginStart
    ) -> tuple[str, str, list[str], list[str], dict[str, str], str]:
        """Issuer, client id, scopes, resources, the endpoints the profile names, and its
        ``token_binding`` (RFC 9449).

        The device flow uses the profile's ``device_client_id`` when it names one (a
        provider may not let one client hold both grants); the profile's endpoints
        and device client apply only to the profile's own issuer (endpoints.py).
        """
        try:
            config = self.config_loader()
        except ConfigError as exc:
            raise OpError(ErrorCode.CONFIG_ERROR, str(exc)) from None
        profile = config.profiles.get(request.profile)
        issuer = (request.issuer or (profile.issuer if profile else None)
                  or DEFAULT_ISSUER).rstrip("/")
        same_provider = for_issuer(profile, issuer)
        endpoints = same_provider.endpoints() if same_provider is not None else {}
        device_client_id = same_provider.device_client_id \
            if same_provider is not None and request.flow == "device" else None
        client_id = request.client_id or device_client_id \
            or (profile.client_id if profile else None) or DEFAULT_CLIENT_ID
        scopes = request.scope or (profile.scopes if profile else None) or list(DEFAULT_SCOPES)
        resources = (profile.resources if profile and profile.resources else [])
        binding = (profile.token_binding if profile else None) or "bearer"
        return issuer, client_id, list(scopes), list(resources), endpoints, binding

    def _hold_login(self, login: Login) -> None:
        """Hold a new login: it replaces the profile's pending one, and at most MAX_LOGINS
        are held (finished ones nobody collected make room first; else ``busy``).

        Synchronous, so concurrent login_start requests cannot all pass the check.
        """
        for old in [held for held in self._held.values() if held.profile == login.profile]:
            self._end_login(old, ErrorCode.LOGIN_FAILED,
                            f"a newer login for profile {login.profile!r} replaced this one")
        for finished in [held for held in self._held.values() if held.done.is_set()]:
            if len(self._held) < MAX_LOGINS:
                break
            del self._held[finished.login_id]
        if len(self._held) >= MAX_LOGINS:
            profiles = ", ".join(sorted(held.profile for held in self._held.values()))
            raise OpError(ErrorCode.BUSY,
                          f"{len(self._held)} logins are already in progress (profiles "
                          f"{profiles}); finish or cancel one of them (Ctrl-C where it runs) "
                          "and try again")
        self._held[login.login_id] = login

    def _end_login(self, login: Login, code: str, message: str) -> None:
        """Stop a login that has not finished (its listener or polling ends) and forget it."""
        self._held.pop(login.login_id, None)
        login.cancel_scope.cancel()
        if not login.done.is_set():
            self._fail_login(login, code, message)

    def connection_closed(self, owner: object) -> None:
        """End the logins the closed connection started: nobody is left to wait for them."""
        for login in [held for held in self._held.values() if held.owner is owner]:
            self._end_login(login, ErrorCode.LOGIN_FAILED,
                            "cancelled: the connection that started it closed")

    async def login_start(
        self, request: p.LoginStart, owner: object = None
    ) -> p.LoginStartResult:
        issuer, client_id, scopes, resources, endpoints, binding = self._login_settings(request)
        try:
            metadata = await self.provider.discover(issuer, endpoints)
        except oidc.ProviderUnreachable as exc:
            raise OpError(ErrorCode.PROVIDER_UNREACHABLE,
                          f"cannot reach the provider {issuer}: {exc}") from None
        except oidc.OAuthFailure as exc:
            raise OpError(ErrorCode.PROVIDER_ERROR, str(exc)) from None
        login = Login(_new_id(), request.profile, issuer, client_id, scopes, resources,
                      self.now() + LOGIN_TTL, owner=owner, token_binding=binding)
        if binding != "bearer":
            from compozy_agent.dpop_binding import new_login_key

            login.dpop_key = new_login_key(binding, metadata, request.profile)
        self._hold_login(login)
        if request.flow == "device":
            try:
                device = await self.provider.device_authorize(oidc.device_authorization_request(
                    metadata, client_id=client_id, scopes=scopes, resources=resources))
            except oidc.OAuthFailure as exc:
                self._held.pop(login.login_id, None)
                raise OpError(ErrorCode.LOGIN_FAILED, f"the provider refused: {exc}") from None
            login.expires_at = self.now() + device.expires_in
            self.driver.spawn(self._device_flow, login, metadata, device)
            return p.LoginStartResult(
                login_id=login.login_id, flow="device", issuer=issuer,
                verification_uri=one_line(device.verification_uri, 2000),
                verification_uri_complete=one_line(device.verification_uri_complete, 2000)
                if device.verification_uri_complete else None,
                user_code=one_line(device.user_code, 64), interval=device.interval,
                expires_in=device.expires_in,
            )
        pkce = oidc.new_pkce()
        state = oidc.new_state()
        login.nonce = oidc.new_nonce()
        # aiohttp (about 10 MiB) is imported only by an agent that does a browser login.
        from compozy_agent.loopback import LoopbackRedirect

        # RFC 9207 section 2.4: the response's iss must name the issuer this request went
        # to (mix-up defence); required when the provider says it sends one.
        listener = LoopbackRedirect(
            state, issuer=metadata.issuer,
            issuer_required=metadata.authorization_response_iss_parameter_supported)
        try:
            await listener.start()
            url = oidc.authorization_url(metadata, client_id=client_id,
                                         redirect_uri=listener.redirect_uri, scopes=scopes,
                                         state=state, pkce=pkce, nonce=login.nonce,
                                         resources=resources,
                                         dpop_jkt=login.dpop_key.thumbprint
                                         if login.dpop_key is not None else None)
        except (oidc.OAuthFailure, OSError) as exc:
            with anyio.CancelScope(shield=True):
                await listener.close()
            self._held.pop(login.login_id, None)
            raise OpError(ErrorCode.LOGIN_FAILED, str(exc)) from None
        self.driver.spawn(self._browser_flow, login, metadata, listener, pkce)
        return p.LoginStartResult(login_id=login.login_id, flow="browser", issuer=issuer,
                                  authorization_url=url, expires_in=LOGIN_TTL)

    async def _browser_flow(self, login: Login, metadata: oidc.ProviderMetadata,
                            listener: LoopbackRedirect, pkce: oidc.Pkce) -> None:
        try:
            await self._browser_login(login, metadata, listener, pkce)
        finally:
            login.released.set()

    async def _browser_login(self, login: Login, metadata: oidc.ProviderMetadata,
                             listener: LoopbackRedirect, pkce: oidc.Pkce) -> None:
        with login.cancel_scope:
            try:
                with anyio.fail_after(LOGIN_TTL):
                    code = await listener.wait()
            except TimeoutError:
                self._fail_login(login, ErrorCode.LOGIN_TIMEOUT,
                                 "nobody completed the browser login in time")
                return
            except oidc.OAuthError as exc:  # RFC 6749 4.1.2.1: error= on the redirect
                self._fail_login(login, ErrorCode.ACCESS_DENIED if exc.error == "access_denied"
                                 else ErrorCode.LOGIN_FAILED, f"the provider said {exc}")
                return
            except oidc.CallbackError as exc:  # another issuer (RFC 9207), no code
                self._fail_login(login, ErrorCode.LOGIN_FAILED,
                                 f"refused the login response: {exc}; no code was exchanged")
                return
            finally:
                # Shielded: a cancelled login (replaced, its connection closed) must still
                # close its port rather than be interrupted halfway.
                with anyio.CancelScope(shield=True):
                    await listener.close()
                log.debug("login %s: stopped listening on 127.0.0.1:%d",
                          login.login_id, listener.port)
            await self._exchange(login, metadata, oidc.code_exchange_request(
                metadata, client_id=login.client_id, code=code,
                redirect_uri=listener.redirect_uri, pkce=pkce))

    async def _device_flow(self, login: Login, metadata: oidc.ProviderMetadata,
                           device: oidc.DeviceAuthorization) -> None:
        try:
            await self._device_login(login, metadata, device)
        finally:
            login.released.set()

    async def _device_login(self, login: Login, metadata: oidc.ProviderMetadata,
                            device: oidc.DeviceAuthorization) -> None:
        interval = max(device.interval, 1.0)
        with login.cancel_scope:
            while True:
                await self.clock.sleep_until(self.now() + interval)
                if self.now() > login.expires_at:
                    self._fail_login(login, ErrorCode.LOGIN_TIMEOUT,
                                     "the device code expired before the login was approved")
                    return
                try:
                    answer = await self.provider.poll_device(
                        metadata, client_id=login.client_id, device_code=device.device_code,
                        dpop=login.dpop_signer(self.now))
                except oidc.OAuthError as exc:
                    match exc.error:
                        case "expired_token":
                            self._fail_login(login, ErrorCode.LOGIN_TIMEOUT,
                                             "the device code expired; run the login again")
                        case "access_denied":
                            self._fail_login(login, ErrorCode.ACCESS_DENIED,
                                             "the login was denied")
                        case "device_not_found" | "invalid_grant":
                            # Not RFC 8628 codes, but what providers say (404
                            # device_not_found from django-oauth-toolkit) once a device
                            # code is gone: expired, used, or lost in a restart.
                            self._fail_login(
                                login, ErrorCode.LOGIN_TIMEOUT,
                                f"the provider no longer knows this device code ({exc.error}"
                                "): it expired or was already used; run the login again")
                        case "use_dpop_nonce" if login.dpop_key is not None:
                            # RFC 9449 section 8: a nonce demanded again after the one
                            # retry (or without a nonce to retry with): the next poll
                            # carries the newest nonce the provider sent.
                            continue
                        case _:
                            self._fail_login(login, ErrorCode.LOGIN_FAILED,
                                             f"the provider said {exc}")
                    return
                except (oidc.TransientProviderError, oidc.ProviderUnreachable) as exc:
                    log.warning("device login %s: polling failed (%s); retrying",
                                login.login_id, exc)
                    continue
                except oidc.OAuthFailure as exc:
                    self._fail_login(login, ErrorCode.LOGIN_FAILED, str(exc))
                    return
                match answer:
                    case oidc.DevicePending():
                        continue
                    case oidc.DeviceSlowDown():  # RFC 8628 section 3.5
                        interval = answer.next_interval(interval)
                        continue
                    case oidc.TokenResponse():
                        await self._finish(login, metadata, answer, answer.received_at)
                        return

    async def _exchange(self, login: Login, metadata: oidc.ProviderMetadata,
                        request: oidc.HttpRequest) -> None:
        try:
            response, received_at = await self.provider.token(
                request, dpop=login.dpop_signer(self.now))
        except oidc.OAuthFailure as exc:
            self._fail_login(login, ErrorCode.LOGIN_FAILED, f"exchanging the code failed: {exc}")
            return
        await self._finish(login, metadata, response, received_at)

    async def _finish(self, login: Login, metadata: oidc.ProviderMetadata,
                      response: oidc.TokenResponse, received_at: float) -> None:
        # The provider has issued the tokens: a login cancelled now (its connection
        # closed) still stores them rather than stopping halfway through the writes.
        with anyio.CancelScope(shield=True):
            await self._adopt_login(login, metadata, response, received_at)

    async def _adopt_login(self, login: Login, metadata: oidc.ProviderMetadata,
                           response: oidc.TokenResponse, received_at: float) -> None:
        if login.dpop_key is not None or response.token_type != "Bearer":
            from compozy_agent.dpop_binding import check_token_type

            refusal = check_token_type(login, response.token_type)
            if refusal is not None:
                self._fail_login(login, ErrorCode.LOGIN_FAILED, refusal)
                return
        claims: dict[str, object] = {}
        if response.id_token:
            claims = oidc.decode_jwt_claims(response.id_token)
            try:
                # The nonce (browser logins) ties the ID token to this login's request
                # (OIDC Core 3.1.3.7 item 11).
                oidc.validate_id_token_claims(claims, issuer=login.issuer,
                                              client_id=login.client_id, now=received_at,
                                              nonce=login.nonce)
            except oidc.MalformedResponse as exc:
                self._fail_login(login, ErrorCode.LOGIN_FAILED, str(exc))
                return
        subject = claims.get("sub")
        if oidc.account_from_claims(claims) in (None, subject) and metadata.userinfo_endpoint:
            try:  # a nicety; the login stands without it
                # OIDC Core 5.3.2: an answer about another sub than the ID token's
                # MUST NOT be used.
                request = oidc.userinfo_request(metadata, response.access_token)
                if login.dpop_key is not None:  # RFC 9449 section 7.1
                    from compozy_agent.dpop_binding import dpop_resource_request

                    request = dpop_resource_request(request, login.dpop_key,
                                                    response.access_token, self.now())
                claims = {**claims, **await self.provider.userinfo(
                    request, subject=subject if isinstance(subject, str) else None)}
            except oidc.OAuthFailure as exc:
                log.warning("login %s: userinfo not used: %s", login.login_id, exc)
        account = oidc.account_from_claims(claims)
        meta = StoredSession(
            token_id=_new_id(), profile=login.profile, kind="oidc", issuer=login.issuer,
            client_id=login.client_id,
            subject=str(claims["sub"]) if "sub" in claims else None,
            account=one_line(account, ACCOUNT_LIMIT) if account is not None else None,
            scopes=response.scope or login.scopes, resources=login.resources,
            created_at=received_at,
        )
        if login.dpop_key is not None:
            meta.token_binding = "dpop"
            meta.dpop_algorithm = login.dpop_key.algorithm
            meta.dpop_thumbprint = login.dpop_key.thumbprint
            try:  # first: a refresh token saved without its key would be useless
                await self.driver.store.put_secret(meta.token_id, "dpop_key",
                                                   login.dpop_key.to_secret())
            except StoreError as exc:
                # The tokens stay bound to a key nobody keeps: useless to anyone.
                self._fail_login(login, ErrorCode.STORAGE_ERROR,
                                 f"could not save the session's DPoP key ({exc}); nothing was "
                                 "kept, log in again")
                return
        # Its life counts from when the request was sent (lifecycle rule 2).
        access_token = usable_token(response.access_token, sent_at=response.issued_at,
                                    expires_at=response.expires_at, scope=response.scope)
        saved = True
        if response.refresh_token is not None:
            try:
                await self.driver.store.put_secret(meta.token_id, "refresh_token",
                                                   response.refresh_token)
            except StoreError as exc:
                # Kept in memory; the lifecycle retries the write and status warns (rule 4).
                log.error("session %s: could not save the refresh token (%s); retrying",
                          meta.token_id, exc)
                saved = False
        lifecycle = SessionLifecycle(
            received_at, refresh_token=response.refresh_token, access_token=access_token,
            refresh_token_saved=saved, granted_scopes=meta.scopes)
        session = Session(meta, lifecycle, dpop_key=login.dpop_key)
        try:
            await self.adopt(session)
        except OpError as exc:
            self._fail_login(login, exc.code, exc.message)
            return
        login.session = session
        login.done.set()
        log.info("profile %s: logged in to %s as %s (session %s)", login.profile, login.issuer,
                 meta.account, meta.token_id)

    async def adopt(self, session: Session) -> None:
        """Hand a new session to the driver, replacing the profile's previous one."""
        for old in await self.driver.hold(session):
            # The old session is replaced; it stays valid at the provider unless revoked.
            reason = await self.revocation.revoke_at_provider(old)
            if reason:
                log.warning("replaced session %s was not revoked: %s", old.meta.token_id, reason)
            await self.driver.forget(old)
        self.driver.reschedule(session)

    def _fail_login(self, login: Login, code: str, message: str) -> None:
        if login.done.is_set():
            return  # ended already (cancelled, replaced): the first outcome stands
        login.error = OpError(code, message)  # one printable line: it quotes provider text
        log.warning("login %s (profile %s) failed: %s", login.login_id, login.profile,
                    login.error.message)
        login.done.set()

    async def login_wait(self, request: p.LoginWait) -> p.LoginWaitResult:
        login = self._held.get(request.login_id)
        if login is None:
            raise OpError(ErrorCode.UNKNOWN_LOGIN, f"no login {request.login_id!r} in progress")
        with anyio.move_on_after(max(0.0, min(request.timeout, 300.0))):
            await login.done.wait()
        if not login.done.is_set():
            return p.LoginWaitResult(state="pending")
        self._held.pop(login.login_id, None)
        if login.error is not None:
            raise login.error
        assert login.session is not None
        return p.LoginWaitResult(state="done", session=self.driver.info(login.session, self.now()))

    async def login_cancel(self, request: p.LoginCancel) -> p.Empty:
        login = self._held.get(request.login_id)
        if login is None:
            raise OpError(ErrorCode.UNKNOWN_LOGIN, f"no login {request.login_id!r} in progress")
        self._end_login(login, ErrorCode.LOGIN_FAILED, "cancelled")
        return p.Empty()

    async def store_api_key(self, request: p.StoreApiKey) -> p.SessionInfo:
        """An API key becomes its profile's session: no provider, nothing to refresh."""
        meta = StoredSession(token_id=_new_id(), profile=request.profile, kind="api_key",
                             created_at=self.now())
        session = Session(meta, None, api_key=request.api_key)
        await self.adopt(session)
        return self.driver.info(session, self.now())
