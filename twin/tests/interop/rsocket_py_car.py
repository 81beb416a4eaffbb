#!/usr/bin/env python3
"""A car written with rsocket-py (PyPI `rsocket`, version 0.4.20), driven by twin/tests/interop.rs.

It connects to the twin over mutual TLS 1.3, sends `car.hello`, opens the `car.desired` stream and
waits for the first signed desired state (an envelope under "desired").

stdout, one line each, flushed at once:
    HELLO <HelloReply as JSON>
    DESIRED <DesiredState as JSON>     (one line per item received)

Exit codes: 0 once an item with counter >= 1 arrived; 1 if the stream or the connection ended
first or a request failed; 2 after --timeout seconds. The reason goes to stderr.
"""

import argparse
import asyncio
import json
import logging
import ssl
import sys
from datetime import timedelta

from reactivestreams.subscriber import Subscriber
from rsocket.extensions.helpers import composite, route
from rsocket.extensions.mimetypes import WellKnownMimeTypes
from rsocket.helpers import single_transport_provider
from rsocket.payload import Payload
from rsocket.request_handler import BaseRequestHandler
from rsocket.rsocket_client import RSocketClient
from rsocket.transports.tcp import TransportTCP

AGENT_VERSION = "rsocket-py"
# The twin drops a peer that is silent for 3 of its heartbeat intervals (2 s in the test). The
# client sends a KEEPALIVE (flag RESPOND) every period and the twin answers it.
KEEPALIVE = timedelta(seconds=1)
# Sent in SETUP (the twin ignores it); rsocket-py also uses it on its own side: if the twin has
# not answered a KEEPALIVE for this long, the client stops.
MAX_LIFETIME = timedelta(seconds=6)


def fail(message: str, code: int = 1) -> int:
    print(message, file=sys.stderr, flush=True)
    return code


class Events:
    """Everything the script waits for, in arrival order, as (kind, value) on one queue."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, kind: str, value=None) -> None:
        self.queue.put_nowait((kind, value))


class QueueSubscriber(Subscriber):
    """Puts every stream signal on the queue; never asks for anything beyond the initial demand."""

    def __init__(self, events: Events) -> None:
        self.events = events
        self.subscription = None

    def on_subscribe(self, subscription) -> None:
        self.subscription = subscription

    def on_next(self, value, is_complete=False) -> None:
        self.events.put("next", value)
        if is_complete:
            self.events.put("complete")

    def on_error(self, exception: Exception) -> None:
        self.events.put("error", exception)

    def on_complete(self) -> None:
        self.events.put("complete")


def handler_factory(events: Events):
    class Handler(BaseRequestHandler):
        async def on_error(self, error_code, payload):
            # An ERROR frame on stream 0 (e.g. REJECTED_SETUP).
            data = payload.data.decode("utf-8", "replace") if payload.data else ""
            events.put("connection-error", f"{error_code.name}: {data}")

        async def on_keepalive_timeout(self, time_since_last_keepalive, rsocket):
            events.put("connection-error", f"the twin answered no KEEPALIVE for {time_since_last_keepalive}")

        async def on_close(self, rsocket, exception=None):
            events.put("closed", exception)

    return Handler


def tls_context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)  # only the fleet CA
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(cert, key)  # the registered car certificate
    return context


async def run(args: argparse.Namespace) -> int:
    events = Events()
    reader, writer = await asyncio.open_connection(
        args.host, args.port, ssl=tls_context(args.ca, args.cert, args.key)
    )
    setup = json.dumps({"car_id": args.car_id, "agent_version": AGENT_VERSION}).encode()
    async with RSocketClient(
        single_transport_provider(TransportTCP(reader, writer)),
        handler_factory=handler_factory(events),
        metadata_encoding=WellKnownMimeTypes.MESSAGE_RSOCKET_COMPOSITE_METADATA,
        data_encoding=WellKnownMimeTypes.APPLICATION_JSON,
        keep_alive_period=KEEPALIVE,
        max_lifetime_period=MAX_LIFETIME,
        setup_payload=Payload(setup),
    ) as client:
        hello = {
            "agent_version": AGENT_VERSION,
            "reported": {"phase": "idle", "desired_counter": None, "release": None, "last_error": None},
        }
        request = client.request_response(Payload(json.dumps(hello).encode(), composite(route("car.hello"))))
        # An early connection error would otherwise leave the request pending until --timeout.
        waiter = asyncio.ensure_future(events.queue.get())
        done, _ = await asyncio.wait({request, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if request not in done:
            kind, value = waiter.result()
            return fail(f"car.hello: {kind} before the answer: {value}")
        waiter.cancel()
        try:
            reply = request.result()
        except Exception as e:  # noqa: BLE001 - report whatever rsocket-py raised
            return fail(f"car.hello failed: {type(e).__name__}: {e}")
        print("HELLO", json.dumps(json.loads(reply.data)), flush=True)

        subscriber = QueueSubscriber(events)
        client.request_stream(Payload(b"{}", composite(route("car.desired")))).subscribe(subscriber)
        while True:
            kind, value = await events.queue.get()
            if kind != "next":
                return fail(f"car.desired: {kind} before a signed desired state: {value}")
            item = json.loads(value.data)
            print("DESIRED", json.dumps(item), flush=True)
            if isinstance(item.get("desired"), dict) and "payloadType" in item["desired"]:
                if subscriber.subscription is not None:
                    subscriber.subscription.cancel()
                return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--ca", required=True, help="fleet CA certificate (PEM)")
    parser.add_argument("--cert", required=True, help="the car's certificate (PEM)")
    parser.add_argument("--key", required=True, help="the car's private key (PEM)")
    parser.add_argument("--car-id", required=True)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds until giving up (exit 2)")
    parser.add_argument("--debug", action="store_true", help="log every RSocket frame to stderr")
    args = parser.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, stream=sys.stderr)

    async def bounded() -> int:
        try:
            return await asyncio.wait_for(run(args), args.timeout)
        except asyncio.TimeoutError:
            return fail(f"timed out after {args.timeout} s", 2)

    return asyncio.run(bounded())


if __name__ == "__main__":
    sys.exit(main())
