#!/usr/bin/env python3
"""A TCP forwarder that adds a fixed one-way delay in each direction: the propagation delay of a link,
which this kernel cannot add itself (no netem). Bytes are never held back beyond the delay, so the rate
stays whatever the network below allows (`tc tbf` in the benchmarks). A new connection first waits one
round trip, as a TCP handshake over such a link would.

    delay-proxy.py LISTEN_PORT UPSTREAM DELAY_MS STATS_PORT

UPSTREAM is host:port or the path of a unix socket. Connecting to 127.0.0.1:STATS_PORT returns one line,
"down up connections": bytes sent to clients, bytes sent upstream and connections accepted so far.
With $DELAY_PROXY_LOG set, the Range header of every request is appended to that file ("time first last").
"""
import asyncio
import os
import re
import sys
import time

stats = {"down": 0, "up": 0, "connections": 0}
LOG = open(os.environ["DELAY_PROXY_LOG"], "a") if os.environ.get("DELAY_PROXY_LOG") else None
RANGE = re.compile(rb"(?i)range: bytes=(\d+)-(\d+)")


async def pump(reader, writer, delay, key):
    """Copy reader to writer, each piece leaving `delay` seconds after it arrived."""
    queue = asyncio.Queue()

    async def receive():
        while True:
            data = await reader.read(1 << 16)
            await queue.put((time.monotonic() + delay, data))
            if not data:
                return

    async def send():
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            stats[key] += len(data)
            if key == "up" and LOG:
                for m in RANGE.finditer(data):
                    LOG.write(f"{time.monotonic():.4f} {int(m[1])} {int(m[2])}\n")
                    LOG.flush()
            await writer.drain()

    try:
        await asyncio.gather(receive(), send())
    except (ConnectionError, OSError):
        pass


async def handle(client_reader, client_writer, upstream, delay):
    stats["connections"] += 1
    await asyncio.sleep(2 * delay)  # the handshake's round trip
    try:
        if upstream.startswith("/"):
            up_reader, up_writer = await asyncio.open_unix_connection(upstream)
        else:
            host, port = upstream.rsplit(":", 1)
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
    except OSError:
        client_writer.close()
        return
    await asyncio.gather(
        pump(client_reader, up_writer, delay, "up"),
        pump(up_reader, client_writer, delay, "down"),
    )
    for w in (client_writer, up_writer):
        w.close()


async def report(_reader, writer):
    writer.write(f"{stats['down']} {stats['up']} {stats['connections']}\n".encode())
    await writer.drain()
    writer.close()


async def main():
    port, upstream, delay_ms, stats_port = sys.argv[1:5]
    delay = float(delay_ms) / 1000
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, upstream, delay), "127.0.0.1", int(port)
    )
    stats_server = await asyncio.start_server(report, "127.0.0.1", int(stats_port))
    async with server, stats_server:
        await asyncio.gather(server.serve_forever(), stats_server.serve_forever())


if __name__ == "__main__":
    asyncio.run(main())
