#!/usr/bin/env python3
"""
A TCP proxy on 127.0.0.1 that delays every byte by a fixed time each way,
so that a client on this machine is as far from the server as a round trip
of twice that (no bandwidth limit, no loss; what is under way is held in
the proxy's memory, as in a long network path).

    .venv/bin/python bench/delay.py --to PORT --delay-ms 25

prints "listening on PORT" once it accepts connections, and runs until it
is stopped (SIGTERM or SIGINT). Used by C{hotspots.py backups --delay-ms}.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

#: Bytes read from a socket at a time.
READ_SIZE = 256 << 10


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """
    Copy what C{reader} brings to C{writer}, each piece C{delay} seconds
    after it came, then its end.
    """
    loop = asyncio.get_running_loop()
    try:
        while data := await reader.read(READ_SIZE):
            loop.call_later(delay, writer.write, data)
        loop.call_later(delay, writer.write_eof)
    except (ConnectionError, OSError):
        loop.call_later(delay, writer.close)


async def serve(port: int, delay: float) -> None:
    async def connected(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            client_writer.close()
            return
        try:
            await asyncio.gather(pump(client_reader, server_writer, delay), pump(server_reader, client_writer, delay))
            await asyncio.sleep(delay)
        finally:
            server_writer.close()
            client_writer.close()

    loop = asyncio.get_running_loop()

    def quiet_when_stopped(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        if not isinstance(context.get("exception"), asyncio.CancelledError):
            loop.default_exception_handler(context)

    loop.set_exception_handler(quiet_when_stopped)
    server = await asyncio.start_server(connected, "127.0.0.1", 0)
    print(f"listening on {server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip() if __doc__ else None)
    parser.add_argument("--to", type=int, required=True, help="the server's port on 127.0.0.1")
    parser.add_argument("--delay-ms", type=float, required=True, help="milliseconds each byte is delayed, each way")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.to, args.delay_ms / 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
