"""Command line: `run` (default), `check`, `demo`."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from . import config as config_mod
from .ops import logs

log = logging.getLogger("proxy")

EXIT_CONFIG = 2


def _load(path_arg: str | None) -> config_mod.Config:
    return config_mod.load(config_mod.resolve_path(path_arg))


def cmd_check(args: argparse.Namespace) -> int:
    try:
        cfg = _load(args.config)
    except config_mod.ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(cfg.summary())
    print("config OK")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    try:
        cfg = _load(args.config)
    except config_mod.ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    # The environment overrides the config's log settings (handy for one debug run).
    cfg = replace(cfg, log=replace(cfg.log, level=os.environ.get("SIDECAR_LOG_LEVEL", cfg.log.level),
                                   format=os.environ.get("SIDECAR_LOG_FORMAT", cfg.log.format)))
    logs.setup(cfg.log.level, cfg.log.format)
    from .server import serve
    path = config_mod.resolve_path(args.config)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(serve(cfg, reload_config=lambda: config_mod.load(path)))


def _loop_factory():  # type: ignore[no-untyped-def]
    """uvloop when it is installed (pip install 'wechat-token-sidecar[fast]'),
    else asyncio's own loop; SIDECAR_LOOP=asyncio forces the latter."""
    if os.environ.get("SIDECAR_LOOP", "") == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def cmd_demo(args: argparse.Namespace) -> int:
    logs.setup("info", "text")
    return asyncio.run(_demo(args.port, args.admin_port, args.sim_port, args.platform))


async def _demo(port: int, admin_port: int, sim_port: int, platform: bool = False) -> int:
    from aiohttp import web

    from .server import start_sidecar
    from .simulator import (
        DEMO_APPID,
        DEMO_AUTHORIZER_APPID,
        DEMO_COMPONENT_AES_KEY,
        DEMO_COMPONENT_APPID,
        DEMO_COMPONENT_SECRET,
        DEMO_COMPONENT_TOKEN,
        DEMO_MESSAGE_AES_KEY,
        DEMO_MESSAGE_TOKEN,
        DEMO_SECRET,
        SimSettings,
        WeChatSimulator,
    )

    # Short-lived tokens so the refresh-ahead is visible within minutes.
    sim = WeChatSimulator(settings=SimSettings(ttl_s=600))
    sim_runner = web.AppRunner(sim.app(), access_log=None)
    await sim_runner.setup()
    try:
        await web.TCPSite(sim_runner, "127.0.0.1", sim_port).start()
    except OSError as exc:
        print(f"demo: cannot listen for the simulator on 127.0.0.1:{sim_port}: {exc}", file=sys.stderr)
        await sim_runner.cleanup()
        return 1
    sim_port = sim_runner.addresses[0][1]
    # A tiny app behind the sidecar for WeChat's message pushes: it answers
    # each text message with a passive reply.
    receiver = web.Application()
    receiver.router.add_post("/wechat", _demo_receiver)
    receiver.router.add_post("/pay/notify", _demo_pay_receiver)
    # A WeChat Pay merchant: its keys made now, known to the simulator's Pay server.
    pay_dir = tempfile.TemporaryDirectory(prefix="wts-demo-pay-")
    merchant_key, merchant_public = _demo_merchant_keys(Path(pay_dir.name))
    sim.pay_register_merchant(DEMO_MCHID, merchant_public, DEMO_MERCHANT_SERIAL, DEMO_APIV3_KEY)
    receiver_runner = web.AppRunner(receiver, access_log=None)
    await receiver_runner.setup()
    await web.TCPSite(receiver_runner, "127.0.0.1", 0).start()
    receiver_port = receiver_runner.addresses[0][1]
    cfg = config_mod.parse(f"""
listen: {{host: 127.0.0.1, port: {port}}}
admin:  {{host: 127.0.0.1, port: {admin_port}}}
upstream: {{base_url: "http://127.0.0.1:{sim_port}", timeout_s: 5}}
log: {{level: info, format: text}}
callbacks: {{host: 127.0.0.1, port: 0}}                # WeChat's pushes (any free port)
# min_refresh_interval_s 0: the printed curl lines may run back to back
# (a rotation, then an admin refresh); real configs keep the 1 s default.
apps:
  - {{name: mp, appid: {DEMO_APPID}, secret: {DEMO_SECRET}, token_api: stable, refresh_before_s: 240,
      min_refresh_interval_s: 0,
      push: {{token: {DEMO_MESSAGE_TOKEN}, encoding_aes_key: {DEMO_MESSAGE_AES_KEY},
             deliver_to: "http://127.0.0.1:{receiver_port}/wechat"}}}}
""" + (f"""
  - {{name: plat, appid: {DEMO_COMPONENT_APPID}, secret: {DEMO_COMPONENT_SECRET}, token_api: component,
      token: {DEMO_COMPONENT_TOKEN}, encoding_aes_key: {DEMO_COMPONENT_AES_KEY}}}
""" if platform else "") + f"""
merchants:
  - {{name: acme, mchid: "{DEMO_MCHID}", serial_no: {DEMO_MERCHANT_SERIAL}, upstream: "http://127.0.0.1:{sim_port}",
      private_key_file: {merchant_key}, apiv3_key_file: {Path(pay_dir.name) / "apiv3.key"},
      notify_to: "http://127.0.0.1:{receiver_port}/pay/notify"}}
""", "<demo>", env={})
    try:
        running = await start_sidecar(cfg)
    except OSError as exc:
        print(f"demo: cannot listen on 127.0.0.1:{port} / {admin_port}: {exc}. "
              f"Try: python -m proxy demo --port 0 --admin-port 0", file=sys.stderr)
        await sim_runner.cleanup()
        await receiver_runner.cleanup()
        return 1
    p, a = running.proxy_port, running.admin_port
    sim.settings.message_push_url = f"http://127.0.0.1:{running.callbacks_port}/wechat/mp"
    sim.settings.pay_notify_url = f"http://127.0.0.1:{running.callbacks_port}/pay/acme"
    if platform:
        # WeChat pushes the platform a verify ticket every 10 minutes; the
        # first one now, so the component token is there at once.
        sim.settings.push_url = f"http://127.0.0.1:{p}/plat/sidecar/component/event"   # routed like any call
        await sim.push_verify_ticket(DEMO_COMPONENT_APPID)
    ready = await running.sidecar.wait_ready(10)
    extra = f"""
  # Open Platform: an account authorizes the platform (WeChat pushes "authorized";
  # the sidecar exchanges the code with api_query_auth and registers the account)
  curl -s -X POST 'http://127.0.0.1:{sim_port}/_sim/component/authorize?authorizer_appid={DEMO_AUTHORIZER_APPID}'

  # a call for that account, by path prefix or by header: its authorizer_access_token is injected
  curl -s 'http://127.0.0.1:{p}/plat/{DEMO_AUTHORIZER_APPID}/cgi-bin/user/info?openid=OPENID'
  curl -s -H 'X-WeChat-Authorizer: {DEMO_AUTHORIZER_APPID}' 'http://127.0.0.1:{p}/plat/cgi-bin/user/info?openid=OPENID'

  # a platform call: component_access_token is injected
  curl -s -X POST -d '{{"component_appid":"{DEMO_COMPONENT_APPID}"}}' 'http://127.0.0.1:{p}/plat/cgi-bin/component/api_get_authorizer_list'

  # the platform's accounts and their token state (never a token)
  curl -s 'http://127.0.0.1:{a}/admin/authorizers?app=plat'
""" if platform else ""
    print(f"""
status page      : http://127.0.0.1:{a}/   (open it in a browser)

wechat-token-sidecar demo {'(ready)' if ready else '(NOT ready: see the log above)'}
  WeChat simulator : http://127.0.0.1:{sim_port}   (stands in for api.weixin.qq.com)
  sidecar (apps)   : http://127.0.0.1:{p}
  sidecar (admin)  : http://127.0.0.1:{a}

Try these in another terminal:

  # a business call: the sidecar adds the token (the simulator echoes what it got)
  curl -s 'http://127.0.0.1:{p}/cgi-bin/user/info?openid=OPENID&lang=zh_CN'

  # the same through the app prefix, with a POST body
  curl -s -X POST -d '{{"touser":"OPENID","msgtype":"text"}}' 'http://127.0.0.1:{p}/mp/cgi-bin/message/custom/send'

  # someone else rotates the token; the next call sees 40001, refreshes once, replays once
  curl -s -X POST 'http://127.0.0.1:{sim_port}/_sim/rotate?appid={DEMO_APPID}&api=stable'
  curl -s 'http://127.0.0.1:{p}/cgi-bin/user/info?openid=OPENID'

  # a binary download streams through
  curl -s -o /tmp/demo-media.jpg -w '%{{http_code}} %{{size_download}} bytes\\n' 'http://127.0.0.1:{p}/cgi-bin/media/get?media_id=M1&size=1048576'

  # an SDK asking for a token gets the shared one (never a fetch of its own)
  curl -s 'http://127.0.0.1:{p}/cgi-bin/token?grant_type=client_credential&appid=x&secret=y'

  # a JS-SDK page: the shared jsapi ticket, and wx.config's fields signed for a page URL
  curl -s 'http://127.0.0.1:{p}/cgi-bin/ticket/getticket?type=jsapi'
  curl -s 'http://127.0.0.1:{p}/sidecar/jssdk?url=https%3A%2F%2Fshop.example.com%2Fitem%3Fid%3D7'

  # WeChat pushes a message (signed, encrypted): the sidecar checks and decrypts it, the
  # app beside it gets plain XML and answers; its reply goes back encrypted (the simulator decrypts it)
  curl -s -X POST 'http://127.0.0.1:{sim_port}/_sim/push_message?text=hello'

  # WeChat Pay: an order, signed by the sidecar (the app holds no merchant key); the answer verified
  curl -s -X POST -H 'Content-Type: application/json' -d '{{"appid":"{DEMO_APPID}","mchid":"{DEMO_MCHID}","description":"a cup","out_trade_no":"DEMO1","notify_url":"https://example.com/pay","amount":{{"total":1}},"payer":{{"openid":"oDemoUser"}}}}' 'http://127.0.0.1:{p}/v3/pay/transactions/jsapi'
  # the signed parameters a page gives wx.requestPayment, and WeChat Pay's notification, verified and decrypted
  curl -s 'http://127.0.0.1:{p}/sidecar/pay/jsapi?appid={DEMO_APPID}&prepay_id=wx06100000000000demo'
  curl -s -X POST 'http://127.0.0.1:{sim_port}/_sim/pay/notify?out_trade_no=DEMO1'

  # health, readiness, per-app state, refresh now
  curl -s http://127.0.0.1:{a}/readyz
  curl -s http://127.0.0.1:{a}/admin/apps
  curl -s -X POST 'http://127.0.0.1:{a}/admin/refresh?app=mp'

{extra}
  # how many token fetches WeChat saw
  curl -s http://127.0.0.1:{sim_port}/_sim/stats

Press Ctrl-C to stop.
""", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await running.stop()
    await sim_runner.cleanup()
    await receiver_runner.cleanup()
    pay_dir.cleanup()
    print("demo stopped")
    return 0


async def _demo_receiver(request):  # type: ignore[no-untyped-def]
    """The demo app: a passive reply to each text message, as plain XML."""
    import re

    from aiohttp import web
    body = (await request.read()).decode("utf-8", "replace")
    said = re.search(r"<Content><!\[CDATA\[(.*?)\]\]></Content>", body)
    user = re.search(r"<FromUserName><!\[CDATA\[(.*?)\]\]></FromUserName>", body)
    if said is None or user is None:
        return web.Response(text="success")
    return web.Response(text=f"<xml><ToUserName><![CDATA[{user.group(1)}]]></ToUserName><FromUserName>"
                             f"<![CDATA[gh_demo]]></FromUserName><CreateTime>{int(time.time())}</CreateTime>"
                             f"<MsgType><![CDATA[text]]></MsgType><Content><![CDATA[you said: {said.group(1)}]]>"
                             f"</Content></xml>", content_type="text/xml")


DEMO_MCHID = "1900000109"
DEMO_MERCHANT_SERIAL = "5157F09EFDC096DE15EBE81A47057A72"
DEMO_APIV3_KEY = b"demo-apiv3-key-0123456789abcdefg"[:32]


def _demo_merchant_keys(directory: Path) -> tuple[Path, bytes]:
    """A merchant private key file (and the APIv3 key file) for the demo; its public key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = directory / "apiclient_key.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    (directory / "apiv3.key").write_bytes(DEMO_APIV3_KEY)
    return path, key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)


async def _demo_pay_receiver(request):  # type: ignore[no-untyped-def]
    """The demo app's payment notifications: printed, acknowledged."""
    from aiohttp import web
    note = await request.json()
    resource = note.get("resource", {})
    print(f"demo app: payment notification {request.headers.get('X-WeChat-Notification-Id')}: "
          f"{resource.get('out_trade_no')} {resource.get('trade_state')}", flush=True)
    return web.Response(status=204)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="wechat-token-sidecar",
        description="A sidecar that owns a WeChat access_token for the apps beside it.")
    sub = parser.add_subparsers(dest="command")
    for name, help_text in (("run", "serve (the default)"), ("check", "validate the config and exit")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", default=argparse.SUPPRESS,
                       help="config file (default: $SIDECAR_CONFIG, else ./config.yaml)")
    demo = sub.add_parser("demo", help="the sidecar in front of its built-in WeChat simulator")
    demo.add_argument("--port", type=int, default=8080, help="proxy port (0: any free port)")
    demo.add_argument("--admin-port", type=int, default=9090, help="admin port (0: any free port)")
    demo.add_argument("--sim-port", type=int, default=0, help="simulator port (default: any free port)")
    demo.add_argument("--platform", action="store_true",
                      help="also an Open Platform app: verify ticket pushes, an authorized account, its calls")
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.command is None:
        args.command = "run"
    handlers = {"run": cmd_run, "check": cmd_check, "demo": cmd_demo}
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
