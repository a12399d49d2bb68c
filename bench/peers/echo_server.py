"""Baseline for the idle scenario (``--peer picows-echo``): a bare picows server
that greets each connection with a wscluster-shaped ``welcome`` and echoes text frames. It
holds no routing state, so its RSS per connection is the floor a picows gateway can reach.

    python bench/peers/echo_server.py --port 8001
"""

from __future__ import annotations

import argparse
from typing import Any

import uvloop
from picows import WSListener, WSMsgType, WSTransport, ws_create_server

WELCOME = b'{"type":"welcome","client_id":"echo","node":"echo","uid":null,"heartbeat":25}'


class Echo(WSListener):
    def on_ws_connected(self, transport: WSTransport) -> None:
        transport.send(WSMsgType.TEXT, WELCOME)

    def on_ws_frame(self, transport: WSTransport, frame: Any) -> None:
        if frame.msg_type is WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()
        elif frame.msg_type is WSMsgType.TEXT:
            transport.send(WSMsgType.TEXT, frame.get_payload_as_bytes())


async def serve(host: str, port: int) -> None:
    # the transport settings of wscluster's gateway (asyncio transport, 2 KiB read buffer)
    server = await ws_create_server(lambda _req: Echo(), host, port, backlog=4096,
                                    read_buffer_init_size=2048, use_aiofastnet=False)  # fmt: skip
    await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
