"""A bare JSON-lines server: the cost floor of a Python socket server on this machine.

Same architecture as the agent (anyio on asyncio, a Unix stream socket, one
task per connection, lines read with a size limit, each decoded with msgspec
and answered with one encoded line of the size of a token answer), and
nothing else: no peer check, no dispatch, no sessions, no audit log.

    python bench/echo_server.py SOCKET_PATH
"""

from __future__ import annotations

import os
import socket
import sys

import anyio
import anyio.abc
import msgspec
from anyio.streams.buffered import BufferedByteReceiveStream

MAX_LINE = 64 * 1024
_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()
_TOKEN = "x" * 43


async def handle(stream: anyio.abc.SocketStream) -> None:
    async with stream:
        reader = BufferedByteReceiveStream(stream)
        try:
            while True:
                line = await reader.receive_until(b"\n", MAX_LINE)
                request = _decoder.decode(line)
                answer = {"id": request.get("id"), "ok": True,
                          "result": {"access_token": _TOKEN, "token_type": "Bearer",
                                     "expires_at": 1.0, "token_id": "echo", "profile": "default"}}
                await stream.send(_encoder.encode(answer) + b"\n")
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError):
            pass


async def serve(path: str) -> None:
    with __import__("contextlib").suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(128)
    listener = await anyio.abc.SocketListener.from_socket(sock)
    print("serving", flush=True)
    await listener.serve(handle)


if __name__ == "__main__":
    anyio.run(serve, sys.argv[1])
