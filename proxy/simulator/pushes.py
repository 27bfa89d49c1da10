"""Message pushes, as WeChat sends them to an account's server URL
(wechat-push-notes.md §3-§6): signed, encrypted in safe mode (XML or JSON),
sent again every 5 s (three retries) when no answer came in time, and the
passive reply checked: its MsgSignature and decryption when encrypted."""
from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from typing import Any

from aiohttp import web

from ..wechat.crypto import MessageCrypto, plain_signature, signature
from .core import DEMO_APPID, SimCore

# WeChat waits 5 s for an answer, then sends the push again, three times.
PUSH_WAIT_S = 5.0
PUSH_RETRIES = 3

# The demo account's server settings (its message token and EncodingAESKey).
DEMO_MESSAGE_TOKEN = "demo-push-token"
DEMO_MESSAGE_AES_KEY = "ZYXWVUTSRQPONMLKJIHGFEDCBAzyxwvutsrqponmlkj"


class PushApis(SimCore):
    def message_account(self, appid: str) -> tuple[str, str]:
        """(message token, EncodingAESKey) of an account's server configuration."""
        return self.message_accounts.get(appid, (DEMO_MESSAGE_TOKEN, DEMO_MESSAGE_AES_KEY))

    def message_push(self, appid: str, message: bytes, mode: str = "safe", as_json: bool = False,
                     at: float | None = None) -> tuple[str, bytes]:
        """(query, body) of one push in `mode` (plaintext, compatible, safe)."""
        token, key = self.message_account(appid)
        timestamp, nonce = str(int(time.time() if at is None else at)), str(secrets.randbelow(10 ** 10) + 1)
        query = f"signature={plain_signature(token, timestamp, nonce)}&timestamp={timestamp}&nonce={nonce}" \
                "&openid=oDemoUser"
        if mode == "plaintext":
            return query, message
        encrypt = MessageCrypto(token, key, appid).encrypt(message)
        query += f"&encrypt_type=aes&msg_signature={signature(token, timestamp, nonce, encrypt)}"
        if as_json:
            return query, json.dumps({"ToUserName": "gh_demo", "Encrypt": encrypt}).encode()
        if mode == "compatible":       # the plaintext fields and the ciphertext side by side
            return query, message.replace(b"</xml>", f"<Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>".encode())
        return query, f"<xml><ToUserName><![CDATA[gh_demo]]></ToUserName><Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>".encode()

    def open_reply(self, appid: str, reply: bytes, as_json: bool) -> str:
        """A passive reply as WeChat reads it: `success` or empty as is; an
        encrypted envelope checked (MsgSignature) and decrypted; else plaintext."""
        text = reply.decode("utf-8", "replace")
        if text in ("", "success"):
            return text
        token, key = self.message_account(appid)
        if as_json and text.lstrip().startswith("{"):
            envelope = json.loads(text)
            encrypt, sig = envelope.get("Encrypt"), envelope.get("MsgSignature")
            timestamp, nonce = str(envelope.get("TimeStamp")), str(envelope.get("Nonce"))
        else:
            found = {k: re.search(rf"<{k}>(?:<!\[CDATA\[)?(.*?)(?:\]\]>)?</{k}>", text)
                     for k in ("Encrypt", "MsgSignature", "TimeStamp", "Nonce")}
            if found["Encrypt"] is None:
                return text
            encrypt, sig, timestamp, nonce = (m.group(1) if m else "" for m in found.values())
        if sig != signature(token, timestamp, nonce, encrypt):
            raise ValueError("the reply's MsgSignature does not match")
        message, receive_id = MessageCrypto(token, key, appid).decrypt(encrypt)
        if receive_id != appid:
            raise ValueError("the reply was encrypted for another appid")
        return message.decode()

    async def send_message(self, url: str, appid: str, message: bytes, mode: str = "safe",
                           as_json: bool = False) -> dict[str, Any]:
        """Push `message` to `url` as WeChat does: wait 5 s, send it again up
        to three times; the answer as WeChat reads it."""
        import aiohttp
        attempts, answer, status = 0, None, 0
        async with aiohttp.ClientSession() as session:
            for attempts in range(1, PUSH_RETRIES + 2):
                # Each send is signed afresh: a new timestamp and nonce (what a
                # replay guard on them assumes of WeChat's retries, push notes §6).
                query, body = self.message_push(appid, message, mode, as_json)
                try:
                    async with session.post(f"{url}?{query}", data=body, timeout=aiohttp.ClientTimeout(
                            total=PUSH_WAIT_S)) as resp:
                        status, answer = resp.status, await resp.read()
                    if status == 200:
                        break
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    status, answer = 0, None
        result: dict[str, Any] = {"status": status, "attempts": attempts}
        if status == 200 and answer is not None:
            result["reply"] = self.open_reply(appid, answer, as_json)
            result["encrypted"] = b"<Encrypt>" in answer or b'"Encrypt"' in answer
        self.messages_sent.append(result)
        return result

    async def ctl_push_message(self, request: web.Request) -> web.Response:
        """POST /_sim/push_message?url=..&appid=..&text=..[&mode=safe|compatible|plaintext][&format=json]"""
        appid = request.query.get("appid", DEMO_APPID)
        url = request.query.get("url") or self.settings.message_push_url
        if not url:
            return web.json_response({"error": "no url: give ?url= or settings.message_push_url"}, status=400)
        text = request.query.get("text", "hello")
        as_json = request.query.get("format") == "json"
        now, msg_id = int(time.time()), str(secrets.randbelow(2 ** 63))
        if as_json:
            message = json.dumps({"ToUserName": "gh_demo", "FromUserName": "oDemoUser", "CreateTime": now,
                                  "MsgType": "text", "Content": text, "MsgId": int(msg_id)}).encode()
        else:
            message = (f"<xml><ToUserName><![CDATA[gh_demo]]></ToUserName><FromUserName><![CDATA[oDemoUser]]>"
                       f"</FromUserName><CreateTime>{now}</CreateTime><MsgType><![CDATA[text]]></MsgType>"
                       f"<Content><![CDATA[{text}]]></Content><MsgId>{msg_id}</MsgId></xml>").encode()
        try:
            result = await self.send_message(url, appid, message, request.query.get("mode", "safe"), as_json)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=502)
        return web.json_response(result)
