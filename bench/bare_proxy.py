"""A bare grpc.aio pass-through proxy: the floor any Python broker can reach.

    python bench/bare_proxy.py --listen 127.0.0.1:PORT --target 127.0.0.1:RUNTIME_PORT

Receives a server-streaming call (any method: bench/kernel.py sends RuntimeService.Generate),
forwards the request bytes unparsed to the target with the caller's deadline, and returns
each reply as it arrives. No validation, scheduling, storage, tracing or logging: what is
left is the cost of one more grpc.aio hop in Python, to compare the kernel against.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator

import grpc

Context = grpc.aio.ServicerContext[bytes, bytes]
Forward = grpc.aio.UnaryStreamMultiCallable[bytes, bytes]


class PassThrough(grpc.GenericRpcHandler):
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[bytes, bytes]:
        # No serializers: the request and the replies stay bytes, never parsed.
        forward_call: Forward = self.channel.unary_stream(details.method)

        async def forward(request: bytes, context: Context) -> AsyncIterator[bytes]:
            async for reply in forward_call(request, timeout=context.time_remaining()):
                yield reply

        return grpc.unary_stream_rpc_method_handler(forward)


async def main(listen: str, target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((PassThrough(channel),))
        server.add_insecure_port(listen)
        await server.start()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop(1.0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--target", required=True)
    args = parser.parse_args()
    asyncio.run(main(args.listen, args.target))
