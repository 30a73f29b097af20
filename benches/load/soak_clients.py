#!/usr/bin/env python3
"""The badly behaved clients of benches/load/soak.sh, next to wrk's well-behaved ones.

    python3 soak_clients.py --port P --seconds S --head-timeout-ms H --idle-timeout-ms I \
        --body-timeout-ms B

For S seconds, on 127.0.0.1:P, each of these runs in a few loops of its own, one connection
at a time per loop:

  leaver    sends a request that takes a while (a fresh code exchange, or a token fetch that
            waits for its quota turn) and leaves 0-300 ms later, before or after the answer,
            half of the time with a reset (SO_LINGER 0), half with a FIN;
  slow      sends its request head in 20 pieces spread over up to 60 % of the head deadline,
            then reads the answer (Connection: close);
  slowbody  sends a POST head at once and its body in pieces spread over up to half the body
            deadline (answered 200); 1 in 4 stops half way (answered 408 at the deadline);
  silent    connects and sends nothing: wxgate closes it at the head deadline;
  trickle   sends a request head one byte a second, never finishing it: closed at the head
            deadline all the same;
  idle      sends one request on a keep-alive connection, reads the answer, then sends
            nothing: wxgate closes it after its idle deadline.

A request counts as answered when a whole HTTP response came back. No interaction starts
after S seconds; those under way finish (each is bounded by its own wait). Prints one JSON
object: per kind, what happened (sent, answered by status, closed by wxgate and after how
long, left, errors), read by soak.sh.
"""

import argparse
import asyncio
import json
import random
import socket
import struct
import time

APPID = "wx00000000000000a1"
SECRET = "stand-in-secret-a1"


def exchange_path(code):
    return (f"/sns/jscode2session?appid={APPID}&secret={SECRET}"
            f"&grant_type=authorization_code&js_code={code}")


TOKEN_PATH = f"/cgi-bin/token?grant_type=client_credential&appid={APPID}&secret={SECRET}"


class Tally:
    """What happened to one kind of client."""

    def __init__(self):
        self.counts = {}
        self.closed_after = []

    def add(self, what, n=1):
        self.counts[what] = self.counts.get(what, 0) + n

    def closed(self, seconds):
        self.add("closed by wxgate")
        self.closed_after.append(seconds)

    def report(self):
        out = dict(sorted(self.counts.items()))
        if self.closed_after:
            out["closed after s (min/max)"] = [round(min(self.closed_after), 2),
                                              round(max(self.closed_after), 2)]
        return out


async def read_response(reader, timeout):
    """One HTTP/1.1 response: its status, or None if the connection ended first."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    if length:
        await asyncio.wait_for(reader.readexactly(length), timeout)
    return status


async def wait_closed_by_peer(reader, limit):
    """Seconds until the peer closes (EOF or reset), or None if it is still open at `limit`."""
    started = time.monotonic()
    try:
        while True:
            remaining = limit - (time.monotonic() - started)
            if remaining <= 0:
                return None
            data = await asyncio.wait_for(reader.read(4096), remaining)
            if not data:
                break
    except asyncio.TimeoutError:
        return None
    except (ConnectionResetError, BrokenPipeError):
        pass
    return time.monotonic() - started


def abort(writer):
    """Closes with a reset (SO_LINGER 0) rather than a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


def request(method, path, headers=(), body=b""):
    lines = [f"{method} {path} HTTP/1.1", "Host: wxgate-soak"]
    lines += list(headers)
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Clients:
    def __init__(self, args):
        self.args = args
        self.deadline = time.monotonic() + args.seconds
        self.head_s = args.head_timeout_ms / 1000
        self.idle_s = args.idle_timeout_ms / 1000
        self.body_s = args.body_timeout_ms / 1000
        # Longer than any answer wxgate may take (quota wait, upstream timeout, retries, a
        # 45011 hold): past it, a request counts as unanswered.
        self.answer_limit = args.answer_limit_s
        self.tallies = {kind: Tally() for kind in
                        ("leaver", "slow", "slowbody", "silent", "trickle", "idle")}
        self.serial = 0

    def code(self, kind):
        self.serial += 1
        return f"{self.args.prefix}{kind}{self.serial}"

    async def connect(self, tally):
        try:
            return await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.args.port), 5)
        except (OSError, asyncio.TimeoutError) as error:
            tally.add(f"connect error {type(error).__name__}")
            await asyncio.sleep(0.5)
            return None

    async def loop(self, kind, interaction):
        tally = self.tallies[kind]
        while time.monotonic() < self.deadline:
            connected = await self.connect(tally)
            if connected is None:
                continue
            reader, writer = connected
            try:
                await interaction(tally, reader, writer)
            except (ConnectionResetError, BrokenPipeError, asyncio.IncompleteReadError) as error:
                tally.add(f"connection ended before the answer ({type(error).__name__})")
            except asyncio.TimeoutError:
                tally.add("no answer in time")
            finally:
                writer.close()

    async def leaver(self, tally, reader, writer):
        if random.random() < 0.5:
            path, what = exchange_path(self.code("leave")), "exchange"
        else:
            path, what = TOKEN_PATH, "token fetch"
        writer.write(request("GET", path))
        await writer.drain()
        tally.add(f"sent ({what})")
        await asyncio.sleep(random.uniform(0, 0.3))
        # Did the answer come before the client left?
        try:
            status = await read_response(reader, 0.001)
            tally.add(f"answered {status} before leaving")
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionResetError):
            tally.add("left before the answer")
        if random.random() < 0.5:
            abort(writer)

    async def slow(self, tally, reader, writer):
        data = request("GET", exchange_path(self.code("slow")), ["Connection: close"])
        spread = random.uniform(0.2, 0.6 * self.head_s)
        pieces = 20
        step = -(-len(data) // pieces)
        tally.add("sent")
        for start in range(0, len(data), step):
            writer.write(data[start:start + step])
            await writer.drain()
            await asyncio.sleep(spread / pieces)
        status = await read_response(reader, self.answer_limit)
        tally.add(f"answered {status}")

    async def slowbody(self, tally, reader, writer):
        stalls = random.random() < 0.25
        body = json.dumps({"content": "slow body " + self.code("body")}).encode()
        head = request("POST", "/wxa/msg_sec_check?access_token=soak-token",
                       ["Content-Type: application/json", "Connection: close",
                        f"Content-Length: {len(body)}"])
        writer.write(head)
        await writer.drain()
        tally.add("sent (body stalls half way)" if stalls else "sent")
        # A body that stalls sends its first half and then nothing: wxgate answers 408 at its
        # body deadline. (Writing on after that answer would only meet a closed socket.)
        spread = self.body_s * random.uniform(0.1, 0.5)
        pieces = 10
        step = -(-len(body) // pieces)
        for start in range(0, len(body) // 2 if stalls else len(body), step):
            writer.write(body[start:start + step])
            await writer.drain()
            await asyncio.sleep(spread / pieces)
        status = await read_response(reader, self.answer_limit)
        tally.add(f"answered {status}")

    async def silent(self, tally, reader, writer):
        tally.add("opened")
        after = await wait_closed_by_peer(reader, self.head_s + 5)
        if after is None:
            tally.add("STILL OPEN past the head deadline + 5 s")
        else:
            tally.closed(after)

    async def trickle(self, tally, reader, writer):
        tally.add("opened")
        data = request("GET", exchange_path(self.code("trickle")))
        started = time.monotonic()
        for byte in data[:-1]:  # never the last byte: the head never completes
            if time.monotonic() - started > self.head_s + 5:
                tally.add("STILL OPEN past the head deadline + 5 s")
                return
            try:
                writer.write(bytes([byte]))
                await writer.drain()
            except (ConnectionResetError, BrokenPipeError):
                tally.closed(time.monotonic() - started)
                return
            try:
                data_read = await asyncio.wait_for(reader.read(4096), 1.0)
                if not data_read:
                    tally.closed(time.monotonic() - started)
                    return
            except asyncio.TimeoutError:
                pass
            except ConnectionResetError:
                tally.closed(time.monotonic() - started)
                return
        tally.add("head sent whole?!")

    async def idle(self, tally, reader, writer):
        writer.write(request("GET", "/cgi-bin/user/info?access_token=soak-token&openid=idle"))
        await writer.drain()
        tally.add("sent")
        status = await read_response(reader, self.answer_limit)
        tally.add(f"answered {status}")
        after = await wait_closed_by_peer(reader, self.idle_s + 5)
        if after is None:
            tally.add("STILL OPEN past the idle deadline + 5 s")
        else:
            tally.closed(after)

    async def run(self):
        a = self.args
        loops = []
        for kind, count in (("leaver", a.leavers), ("slow", a.slow), ("slowbody", a.slow_bodies),
                            ("silent", a.silent), ("trickle", a.tricklers), ("idle", a.idlers)):
            for _ in range(count):
                loops.append(self.loop(kind, getattr(self, kind)))
        await asyncio.gather(*loops)
        return {kind: tally.report() for kind, tally in self.tallies.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--head-timeout-ms", type=int, required=True)
    parser.add_argument("--idle-timeout-ms", type=int, required=True)
    parser.add_argument("--body-timeout-ms", type=int, required=True)
    parser.add_argument("--answer-limit-s", type=float, default=60)
    parser.add_argument("--prefix", default="soakpy")
    parser.add_argument("--leavers", type=int, default=4)
    parser.add_argument("--slow", type=int, default=4)
    parser.add_argument("--slow-bodies", type=int, default=2)
    parser.add_argument("--silent", type=int, default=6)
    parser.add_argument("--tricklers", type=int, default=2)
    parser.add_argument("--idlers", type=int, default=2)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(Clients(args).run())))


if __name__ == "__main__":
    main()
