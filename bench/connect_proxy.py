"""`python bench/connect_proxy.py PORT HOST HOST_PORT TARGET_PORT`: the tests'
CONNECT proxy (tests/egress_proxy.py) as a process for `make bench`: tunnels
to HOST:HOST_PORT end at 127.0.0.1:TARGET_PORT (HOST is a name nobody
resolves; only the proxy knows where it is). Loopback only; stops on SIGTERM."""
from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.egress_proxy import ConnectProxy  # noqa: E402


async def main() -> None:
    port, host, host_port, target = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    proxy = ConnectProxy({(host, host_port): ("127.0.0.1", target)})
    proxy.server = await asyncio.start_server(proxy._client, "127.0.0.1", port, limit=2 ** 20)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(f"CONNECT proxy on 127.0.0.1:{port}: {host}:{host_port} -> 127.0.0.1:{target}", flush=True)
    await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
