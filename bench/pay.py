"""`make bench-pay`: what a WeChat Pay call costs the sidecar beyond a
forwarded call, against its floor: one RSA-2048 signature (the request) the
sidecar cannot avoid. The sidecar (a process, store: memory, access log off)
sits in front of the simulator; N sequential GETs of each kind are timed by
the sidecar's own CPU (/proc), so the simulator's work (it checks and signs
too) is not counted. The signature alone is timed in-process with the same
`cryptography` calls. Loopback only; everything it starts it stops; ~20 s.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import run as bench  # noqa: E402

from proxy.wechat import pay as wxpay  # noqa: E402

MCHID, SERIAL, APIV3 = "1900000109", "5157F09EFDC096DE15EBE81A47057A72", b"0123456789abcdefghijklmnopqrstuv"

SIMULATOR = """
import sys
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from proxy.simulator import WeChatSimulator, SimSettings
sim = WeChatSimulator(accounts={"wxbench": "bench-secret"}, settings=SimSettings(verify_ticket_interval_s=0))
pem = open(sys.argv[2], "rb").read()
key = serialization.load_pem_private_key(pem, password=None)
sim.pay_register_merchant("%s", key.public_key().public_bytes(serialization.Encoding.PEM,
    serialization.PublicFormat.SubjectPublicKeyInfo), "%s", %r)
sim.pay_orders["BENCH1"] = {"mchid": "%s", "out_trade_no": "BENCH1", "transaction_id": "1", "trade_state": "NOTPAY"}
web.run_app(sim.app(), host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
""" % (MCHID, SERIAL, APIV3, MCHID)


async def calls(url: str, count: int) -> list[int]:
    statuses = []
    async with aiohttp.ClientSession() as session:
        for _ in range(count):
            async with session.get(url) as resp:
                await resp.read()
                statuses.append(resp.status)
    return statuses


def sign_alone_us(key: object, rounds: int = 400) -> float:
    data = wxpay.message("GET", "/v3/pay/transactions/out-trade-no/BENCH1?mchid=1900000109", "1733450000",
                         "0123456789abcdef", "")
    started = time.process_time()
    for _ in range(rounds):
        wxpay.sign(key, data)
    return (time.process_time() - started) / rounds * 1e6


def main() -> int:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=1500)
    args = parser.parse_args()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with tempfile.TemporaryDirectory(prefix="wts-pay-") as tmp_name:
        tmp = Path(tmp_name)
        pem = tmp / "apiclient_key.pem"
        pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
        (tmp / "apiv3.key").write_bytes(APIV3)
        sim_port, port, admin = bench.free_port(), bench.free_port(), bench.free_port()
        upstream = f"http://127.0.0.1:{sim_port}"
        config = tmp / "sidecar.yaml"
        config.write_text(f"""
listen: {{host: 127.0.0.1, port: {port}}}
admin: {{host: 127.0.0.1, port: {admin}}}
upstream: {{base_url: "{upstream}", timeout_s: 5}}
log: {{access: false}}
apps:
  - {{name: mp, appid: wxbench, secret: bench-secret, token_api: stable}}
merchants:
  - {{name: acme, mchid: "{MCHID}", serial_no: {SERIAL}, private_key_file: {pem}, apiv3_key_file: {tmp / "apiv3.key"},
      upstream: "{upstream}"}}
""")
        with bench.process(bench.pinned([bench.PY, "-c", SIMULATOR, str(sim_port), str(pem)], 1), cwd=bench.ROOT), \
                bench.process(bench.pinned([bench.PY, "-m", "proxy", "run", "--config", str(config)], 0),
                              cwd=bench.ROOT) as sidecar:
            bench.wait_http(f"http://127.0.0.1:{admin}/readyz")
            forwarded = f"http://127.0.0.1:{port}/cgi-bin/user/info?openid=o1"
            pay = f"http://127.0.0.1:{port}/v3/pay/transactions/out-trade-no/BENCH1?mchid={MCHID}"
            per_call: dict[str, list[float]] = {"forwarded": [], "pay": []}
            for _ in range(3):                                   # interleaved rounds
                for name, url in (("forwarded", forwarded), ("pay", pay)):
                    cpu0 = bench.cpu_seconds(sidecar.pid)
                    statuses = asyncio.run(calls(url, args.count))
                    assert set(statuses) == {200}, set(statuses)
                    per_call[name].append((bench.cpu_seconds(sidecar.pid) - cpu0) / args.count * 1e6)
    sign_us = statistics.median(sign_alone_us(key) for _ in range(3))
    forwarded_us, pay_us = statistics.median(per_call["forwarded"]), statistics.median(per_call["pay"])
    added = pay_us - forwarded_us
    print(f"\nsidecar CPU per call ({args.count} sequential calls x 3 rounds, medians):")
    print(f"- forwarded JSON GET: {forwarded_us:.0f} µs")
    print(f"- WeChat Pay GET (signed, answer verified): {pay_us:.0f} µs")
    print(f"- added by Pay: {added:.0f} µs; one RSA-2048 signature alone: {sign_us:.0f} µs")
    print(f"- added / signature: {added / sign_us:.2f} (target <= 1.2)")
    return 0 if added <= 1.2 * sign_us else 1


if __name__ == "__main__":
    sys.exit(main())
