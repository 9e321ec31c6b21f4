"""Run the django-oauth-toolkit test provider on 127.0.0.1 (started by
tests/support/dot_provider.py; see README.md beside this file).

At start it binds its port, generates a fresh RSA signing key and Django secret,
creates a new SQLite database in ``--state-dir`` (Django's migrations), and adds
the test users and applications through Django's ORM. Then it serves Django's
threaded WSGI server until stdin closes or SIGTERM.

stdout carries one JSON object per line, numbered by ``seq``, and never a token
value outside the ``secrets`` list the tests' canary check takes away:
``{"event": "ready", "issuer": ..., "url": ..., "seq": 1}`` once serving, then one
line per call to the token, revocation, device authorization, userinfo and
introspection endpoints (``status``, ``client_id``, ``grant_type``, ``error``).
``GET /__test__/seq`` (answered here, outside Django) gives the last ``seq``
written, so a reader can wait until it has read every line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

HERE = os.path.dirname(os.path.abspath(__file__))
#: Every test user's password (as for the node provider).
PASSWORD = "test"
USERS = {"alice": "alice@example.com", "bob": "bob@example.com"}
BROWSER_CLIENT_ID = "compozy-cli"
DEVICE_CLIENT_ID = "compozy-device"
COUNTED = {
    "/o/token/": "token",
    "/o/revoke_token/": "revocation",
    "/o/device-authorization/": "device_authorization",
    "/o/userinfo/": "userinfo",
    "/o/introspect/": "introspection",
}

_emit_lock = threading.Lock()
_seq = 0


def emit(event: dict[str, Any]) -> None:
    global _seq
    with _emit_lock:
        _seq += 1
        sys.stdout.write(json.dumps({**event, "seq": _seq}) + "\n")
        sys.stdout.flush()


StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def counting(app: WsgiApp) -> WsgiApp:
    """Wrap Django: answer /__test__/seq, and log the counted endpoints' calls."""

    def wrapped(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/__test__/seq":
            with _emit_lock:
                body = json.dumps({"seq": _seq}).encode()
            start_response("200 OK", [("Content-Type", "application/json")])
            return [body]
        event = COUNTED.get(path)
        if event is None:
            return app(environ, start_response)
        length = int(environ.get("CONTENT_LENGTH") or 0)
        raw = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(raw)
        form = {k: v[0] for k, v in parse_qs(raw.decode(errors="replace")).items()}
        status: list[str] = []

        def capture(status_line: str, headers: list[tuple[str, str]], *rest: Any) -> Any:
            status.append(status_line)
            return start_response(status_line, headers, *rest)

        body = b"".join(app(environ, capture))
        code = int(status[0].split()[0]) if status else 0
        line: dict[str, Any] = {"event": event, "status": code,
                                "method": environ.get("REQUEST_METHOD"),
                                "client_id": form.get("client_id")}
        if event == "token":
            line["grant_type"] = form.get("grant_type")
            line["scope"] = form.get("scope")
        if event == "revocation":
            line["token_type_hint"] = form.get("token_type_hint")
        found = [form[name] for name in
                 ("code", "code_verifier", "refresh_token", "device_code", "token")
                 if form.get(name)]
        try:
            answer = json.loads(body) if body else None
        except ValueError:
            answer = None
        if isinstance(answer, dict):
            if code >= 400 and isinstance(answer.get("error"), str):
                line["error"] = answer["error"]
            if code == 200:
                found += [answer[name] for name in
                          ("access_token", "refresh_token", "id_token", "device_code")
                          if isinstance(answer.get(name), str)]
                if event == "token":
                    line["granted_scope"] = answer.get("scope")
                    line["id_token"] = isinstance(answer.get("id_token"), str)
        if found:
            line["secrets"] = found
        emit(line)
        return [body]

    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--access-token-ttl", type=int, default=3600)
    parser.add_argument("--refresh-token-ttl", type=int, default=1209600)
    parser.add_argument("--device-interval", type=int, default=1)
    parser.add_argument("--exit-with-stdin", action="store_true")
    args = parser.parse_args()

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", args.port))
    port = listener.getsockname()[1]
    url = f"http://127.0.0.1:{port}"

    from jwcrypto import jwk

    key = jwk.JWK.generate(kty="RSA", size=2048)
    os.environ.update(
        DJANGO_SETTINGS_MODULE="dotprovider.settings",
        DOT_SECRET_KEY=secrets.token_urlsafe(50),
        DOT_DATABASE=os.path.join(args.state_dir, "db.sqlite3"),
        DOT_RSA_PRIVATE_KEY=key.export_to_pem(private_key=True, password=None).decode(),
        DOT_ACCESS_TOKEN_TTL=str(args.access_token_ttl),
        DOT_REFRESH_TOKEN_TTL=str(args.refresh_token_ttl),
        DOT_DEVICE_INTERVAL=str(args.device_interval),
        DOT_DEVICE_VERIFICATION_URI=f"{url}/o/device/",
    )
    sys.path.insert(0, HERE)

    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0, interactive=False)

    from django.contrib.auth import get_user_model
    from oauth2_provider.models import get_application_model

    user_model = get_user_model()
    for name, email in USERS.items():
        user_model.objects.create_user(name, email=email, password=PASSWORD)
    application = get_application_model()
    application.objects.create(
        name="Compozy CLI", client_id=BROWSER_CLIENT_ID, client_secret="",
        client_type=application.CLIENT_PUBLIC,
        authorization_grant_type=application.GRANT_AUTHORIZATION_CODE,
        # RFC 8252 section 7.3: any port on the loopback literal matches.
        redirect_uris="http://127.0.0.1/callback",
        algorithm=application.RS256_ALGORITHM, skip_authorization=False,
    )
    # One application holds one grant type: the device flow needs a client of its own.
    application.objects.create(
        name="Compozy CLI (device)", client_id=DEVICE_CLIENT_ID, client_secret="",
        client_type=application.CLIENT_PUBLIC,
        authorization_grant_type=application.GRANT_DEVICE_CODE,
        algorithm=application.RS256_ALGORITHM,
    )

    from django.core.handlers.wsgi import WSGIHandler
    from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass  # request lines go nowhere: the counted calls are on stdout

    server = ThreadedWSGIServer(("127.0.0.1", port), QuietHandler, bind_and_activate=False)
    server.socket.close()
    server.socket = listener
    server.server_address = listener.getsockname()
    server.server_name, server.server_port = "127.0.0.1", port
    server.setup_environ()  # what server_bind would have done
    server.server_activate()
    server.set_app(counting(WSGIHandler()))
    server.daemon_threads = True

    def stop(*_: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    if args.exit_with_stdin:
        threading.Thread(target=lambda: (sys.stdin.read(), stop()), daemon=True).start()
    emit({"event": "ready", "issuer": f"{url}/o", "url": url})
    server.serve_forever(poll_interval=0.2)


if __name__ == "__main__":
    main()
