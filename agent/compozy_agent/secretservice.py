"""The Secret Service (freedesktop.org's keyring API) over one D-Bus connection.

On Linux the agent keeps refresh tokens and keys in the Secret Service
(gnome-keyring, KeePassXC, KWallet's bridge) through this client rather than
through the ``keyring`` package. Both store the same entries (the attributes
and labels below are keyring's), so entries written by one are read by the
other and an upgrade keeps every session. The reason is the first command
after a crash or a login (issue 15, docs/performance.md "Where cold start
goes"): importing ``keyring`` costs about 75 ms (importlib metadata, jaraco,
tarfile, urllib, email) and its backend opens a new D-Bus connection, with a
Diffie-Hellman session and an import of ``cryptography``, for every call;
this client imports jeepney (about 1 ms) and answers each call in one or two
round trips on a connection it keeps.

The secret crosses the bus in the ``plain`` algorithm of the specification,
as go-keyring (``gh``'s keyring) sends it: the session bus is a private Unix
socket of this user, and whoever can read its traffic (this user, root) can
also ask the Secret Service for the item itself. docs/security.md says so.

Blocking: :class:`compozy_agent.store.SessionStore` calls it from its one
keyring thread, never two calls at once. ``keyring`` is still used where this
client does not apply (another platform, another backend chosen, no Secret
Service on the bus): :func:`compozy_agent.store.open_store` decides.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from typing import Any, Final, TypeVar

from jeepney import DBusAddress, MatchRule, MessageType, new_method_call
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import DBusConnection, open_dbus_connection

BUS_NAME: Final = "org.freedesktop.secrets"
SERVICE_PATH: Final = "/org/freedesktop/secrets"
SERVICE_IFACE: Final = "org.freedesktop.Secret.Service"
COLLECTION_IFACE: Final = "org.freedesktop.Secret.Collection"
ITEM_IFACE: Final = "org.freedesktop.Secret.Item"
PROMPT_IFACE: Final = "org.freedesktop.Secret.Prompt"
PROPERTIES_IFACE: Final = "org.freedesktop.DBus.Properties"
#: The keyring package's application id: written into every entry's attributes
#: so that an entry either client writes replaces the other's (the Secret
#: Service replaces only an entry whose attributes are all equal).
KEYRING_APPID: Final = "Python keyring library"
#: keyring's ``preferred_collection`` property, set through the environment.
PREFERRED_COLLECTION_ENV: Final = "KEYRING_PROPERTY_PREFERRED_COLLECTION"
#: One D-Bus round trip; the store's own deadline bounds the whole call.
CALL_TIMEOUT: Final = 10.0
#: How long an unlock prompt may stay open (a person typing a password).
PROMPT_TIMEOUT: Final = 120.0
_T = TypeVar("_T")
#: D-Bus errors meaning there is no Secret Service to talk to.
_NOT_THERE: Final = frozenset({
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
    "org.freedesktop.DBus.Error.Spawn.ChildExited",
    "org.freedesktop.DBus.Error.Spawn.ExecFailed",
    "org.freedesktop.DBus.Error.Spawn.ServiceNotFound",
})
_LOCKED: Final = "org.freedesktop.Secret.Error.IsLocked"
_NO_OBJECT: Final = ("org.freedesktop.Secret.Error.NoSuchObject",
                     "org.freedesktop.DBus.Error.UnknownObject",
                     "org.freedesktop.DBus.Error.UnknownMethod")


class SecretServiceError(Exception):
    """A call failed; the message is this module's own words or a D-Bus error name."""

    def __init__(self, message: str, dbus_name: str = "") -> None:
        super().__init__(message)
        self.dbus_name = dbus_name


class SecretServiceUnavailable(SecretServiceError):
    """No session bus, or no Secret Service on it."""


class SecretServiceLocked(SecretServiceError):
    """The collection is locked and was not unlocked (the prompt was dismissed or is unseen)."""


class _ConnectionBroke(SecretServiceError):
    """The kept connection failed mid-call; it is closed, and the next call opens another."""


class _IsLocked(SecretServiceLocked):
    """The service answered IsLocked: the collection was locked after we looked."""


def _error_name(reply: Any) -> str:
    return str(reply.header.fields.get(4, "")) or "an unnamed D-Bus error"  # 4: ERROR_NAME


class SecretServiceSecrets:
    """Secrets as Secret Service items of service :data:`compozy_agent.store.SERVICE`.

    Implements :class:`compozy_agent.store.SecretBackend`. The connection, its
    session and the collection are found on first use and kept; a broken
    connection is opened again on the next call.
    """

    name = "keyring"
    persistent = True
    description = "SecretService Keyring (freedesktop.org Secret Service over D-Bus)"

    def __init__(self, service: str, address: str | None = None) -> None:
        self._service = service
        self._address = address
        self._connection: DBusConnection | None = None
        self._session = ""
        self._collection = ""
        self._lock_checked = False
        self._closer: Callable[[], object] | None = None

    def __repr__(self) -> str:
        return "SecretServiceSecrets()"

    # ------------------------------------------------------------ the API

    def get(self, key: str) -> str | None:
        return self._once_more_if_broken(lambda: self._get(key))

    def put(self, key: str, value: str) -> None:
        self._once_more_if_broken(lambda: self._put(key, value))

    def delete(self, key: str) -> None:
        """Delete the entry; nothing to do when there is none."""
        self._once_more_if_broken(lambda: self._delete(key))

    def close(self) -> None:
        self._connection = None
        if self._closer is not None:
            self._closer()

    def _once_more_if_broken(self, call: Callable[[], _T]) -> _T:
        """``call()``, tried again on a new connection if the kept one had broken (the
        bus restarted, the service was replaced), or after unlocking a collection
        locked meanwhile. Each call may be repeated: a read, a write that replaces,
        a delete of what is found."""
        try:
            return call()
        except _ConnectionBroke:
            return call()
        except _IsLocked:  # locked since we looked: unlock (perhaps a prompt), once
            self._unlock()
            return call()

    # ------------------------------------------------------------ the calls

    def _get(self, key: str) -> str | None:
        path = self._find(key)
        if path is None:
            return None
        reply = self._call(path, ITEM_IFACE, "GetSecret", "o", (self._session,))
        return bytes(reply[0][2]).decode("utf-8")

    def _put(self, key: str, value: str) -> None:
        collection = self._unlocked_collection()
        properties = {
            f"{ITEM_IFACE}.Label": ("s", f"Password for '{key}' on '{self._service}'"),
            f"{ITEM_IFACE}.Attributes": ("a{ss}", {**self._query(key),
                                                    "application": KEYRING_APPID}),
        }
        secret = (self._session, b"", value.encode("utf-8"), "text/plain")
        _item, prompt = self._call(collection, COLLECTION_IFACE, "CreateItem",
                                   "a{sv}(oayays)b", (properties, secret, True))
        if prompt != "/":
            self._prompt(prompt)

    def _delete(self, key: str) -> None:
        path = self._find(key)
        if path is None:
            return
        try:
            (prompt,) = self._call(path, ITEM_IFACE, "Delete", "", ())
        except SecretServiceError as exc:
            if exc.dbus_name in _NO_OBJECT:  # deleted meanwhile
                return
            raise
        if prompt != "/":
            self._prompt(prompt)

    # ------------------------------------------------------------ the parts

    def _query(self, key: str) -> dict[str, str]:
        return {"username": key, "service": self._service}

    def _find(self, key: str) -> str | None:
        collection = self._unlocked_collection()
        (paths,) = self._call(collection, COLLECTION_IFACE, "SearchItems", "a{ss}",
                              (self._query(key),))
        return str(paths[0]) if paths else None

    def _connect(self) -> DBusConnection:
        if self._connection is not None:
            return self._connection
        try:
            connection = open_dbus_connection(self._address or "SESSION")
        except KeyError:  # jeepney: DBUS_SESSION_BUS_ADDRESS is not set
            raise SecretServiceUnavailable(
                "Secret Service not available: there is no D-Bus session bus") from None
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else \
                type(exc).__name__
            raise SecretServiceUnavailable(
                "Secret Service not available: cannot connect to the D-Bus session bus "
                f"({reason})") from None
        self._connection = connection
        self._lock_checked = False
        # Closed with this object at the latest (an agent keeps it for its life).
        self._closer = weakref.finalize(self, connection.close)
        try:
            # "plain": see the module's docstring.
            self._session = str(self._call(SERVICE_PATH, SERVICE_IFACE, "OpenSession", "sv",
                                           ("plain", ("s", "")))[1])
        except BaseException:
            self.close()
            raise
        return connection

    def _unlocked_collection(self) -> str:
        self._connect()
        if not self._collection:
            self._collection = self._find_collection()
        if not self._lock_checked:
            # Once per connection; afterwards an IsLocked answer says so (and
            # _once_more_if_broken unlocks): one round trip less per call.
            if self._property(self._collection, COLLECTION_IFACE, "Locked"):
                self._unlock()
            self._lock_checked = True
        return self._collection

    def _unlock(self) -> None:
        unlocked, prompt = self._call(SERVICE_PATH, SERVICE_IFACE, "Unlock", "ao",
                                      ([self._collection],))
        if self._collection not in unlocked and prompt != "/":
            self._prompt(prompt)
        if self._property(self._collection, COLLECTION_IFACE, "Locked"):
            raise SecretServiceLocked("the keyring is locked")

    def _find_collection(self) -> str:
        preferred = os.environ.get(PREFERRED_COLLECTION_ENV, "").strip()
        if preferred:
            return preferred
        (path,) = self._call(SERVICE_PATH, SERVICE_IFACE, "ReadAlias", "s", ("default",))
        if path != "/":
            return str(path)
        # No default collection yet (a fresh Secret Service): create one, as
        # keyring (secretstorage) does; the service may ask for a password.
        path, prompt = self._call(SERVICE_PATH, SERVICE_IFACE, "CreateCollection", "a{sv}s",
                                  ({f"{COLLECTION_IFACE}.Label": ("s", "Default")}, "default"))
        if path == "/":
            result = self._prompt(prompt)
            path = result[1] if isinstance(result, tuple) and len(result) == 2 else "/"
        if path == "/":
            raise SecretServiceError("the keyring has no default collection")
        return str(path)

    def _property(self, path: str, interface: str, name: str) -> Any:
        return self._call(path, PROPERTIES_IFACE, "Get", "ss", (interface, name))[0][1]

    def _prompt(self, prompt: str) -> Any:
        """Show the prompt and wait for its answer: the ``Completed`` signal's result."""
        connection = self._connect()
        # No sender in the rule: signals carry the service's unique name, which
        # jeepney's local filter would not match against the well-known one.
        rule = MatchRule(type="signal", interface=PROMPT_IFACE, member="Completed", path=prompt)
        self._check(connection.send_and_get_reply(message_bus.AddMatch(rule),
                                                  timeout=CALL_TIMEOUT))
        try:
            with connection.filter(rule) as signals:
                self._call(prompt, PROMPT_IFACE, "Prompt", "s", ("",))
                try:
                    message = connection.recv_until_filtered(signals, timeout=PROMPT_TIMEOUT)
                except TimeoutError:
                    raise SecretServiceLocked("the keyring is locked (its unlock prompt "
                                              "was not answered)") from None
        finally:
            self._check(connection.send_and_get_reply(message_bus.RemoveMatch(rule),
                                                      timeout=CALL_TIMEOUT))
        dismissed, (_signature, result) = message.body
        if dismissed:
            raise SecretServiceLocked("the keyring is locked (its prompt was dismissed)")
        return result

    def _call(self, path: str, interface: str, method: str, signature: str,
              body: tuple[Any, ...]) -> Any:
        connection = self._connect()
        address = DBusAddress(path, bus_name=BUS_NAME, interface=interface)
        message = new_method_call(address, method, signature or None, body)
        try:
            reply = connection.send_and_get_reply(message, timeout=CALL_TIMEOUT)
        except (OSError, EOFError) as exc:
            self.close()  # opened again on the next call
            raise _ConnectionBroke(
                "the connection to the keyring broke"
                + (f": {exc.strerror}" if isinstance(exc, OSError) and exc.strerror else "")
            ) from None
        return self._check(reply)

    def _check(self, reply: Any) -> Any:
        if reply.header.message_type != MessageType.error:
            return reply.body
        name = _error_name(reply)
        if name in _NOT_THERE:
            raise SecretServiceUnavailable(
                f"Secret Service not available on the session bus ({name})")
        if name == _LOCKED:
            raise _IsLocked("the keyring is locked")
        # Only the error's name: its message is the service's words.
        raise SecretServiceError(f"the Secret Service answered with a D-Bus error ({name})", name)
