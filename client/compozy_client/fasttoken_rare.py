"""The token fast path's rare turns: flags to parse, a timeout, the agent's error
answers, and an answer in another shape than the one :mod:`compozy_client.fasttoken`
reads by hand.

Imported only when taken, so that the common path (``compozy auth token`` with no
flags, answered with a token) compiles none of it where bytecode is not cached.
Standard library only; ``json`` (which loads ``re``) only when an answer needs it.
"""

from __future__ import annotations

import os

#: auth token's flags the fast path takes, each with a value, and the request field it sets.
_FLAGS = {"--profile": "profile", "--audience": "audience", "--min-valid": "min_valid",
          "--scope": "scope"}


def parse_flags(args: list[str]) -> dict[str, object] | None:
    """The request's fields from ``auth token``'s flags; None for any other flag (or
    one without its value): the full CLI's parser then says what is wrong."""
    request: dict[str, object] = {}
    scopes: list[str] = []
    index = 0
    while index < len(args):
        name, eq, value = args[index].partition("=")
        field = _FLAGS.get(name)
        if not eq:
            index += 1
            value = args[index] if index < len(args) else ""
        if field is None or index == len(args):
            return None
        if field == "scope":
            scopes += value.replace(",", " ").split()
        elif field == "min_valid":
            try:
                request[field] = float(value)
            except ValueError:
                return None
        else:
            request[field] = value
        index += 1
    if scopes:
        request["scope"] = scopes
    return request


def timed_out_error(waited: float) -> int:
    """Say that the agent took the request and gave no answer in ``waited`` seconds; 1."""
    os.write(2, (f"error: the agent took the request but did not answer within "
                 f"{waited:.0f} s; it was not asked again (it answers in time whenever it "
                 f"is only waiting for the provider, so it may be stuck)\n"
                 f"  see: compozy auth status\n").encode())
    return 1


def answer(response: bytes) -> int | None:
    """Print the token of a valid success ``response`` (0), or say what its error answer
    says (1); None when it is no answer this path can read (the full CLI reads it
    again and says what is wrong). The agent said no: report it rather than ask again."""
    read = token_from_json(response)
    if read is None:
        return None
    if isinstance(read, str):
        os.write(1, read.encode() + b"\n")
        return 0
    message, command = read
    os.write(2, f"error: {message}\n".encode())
    if command:
        os.write(2, f"  run: {command}\n".encode())
    return 1


def token_from_json(response: bytes) -> str | tuple[str, str] | None:
    """The token of any valid success response, (message, command) of an error response,
    or None."""
    import json

    try:
        document = json.loads(response)
        if document.get("ok") is True:
            token = document["result"]["access_token"]
            return token if isinstance(token, str) and token else None
        error = document["error"]
        details = error.get("details") or {}
        return str(error["message"]), str(details.get("command", ""))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None  # the full CLI reads it again and says what is wrong
