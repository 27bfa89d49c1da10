"""What every push from WeChat goes through before anything acts on it
(wechat-push-notes.md §2-§4): its timestamp within the window, its signature
(plain `signature` over token, timestamp and nonce; or `msg_signature` over
those and the ciphertext), the ciphertext decrypted and its receive id
checked, and the XML or JSON parsed with no DTD and no entity, in any
encoding. Shared by the platform's intake (component_push.py) and the
callbacks listener (messages.py).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from ..wechat.crypto import CryptoError, MessageCrypto, plain_signature, same_signature

# A push is taken only while its timestamp is this close to now. WeChat
# states no window (wechat-push-notes.md §6); 300 s is WeChat Pay's rule and
# the one most SDKs apply to callbacks. A replay memory lasts twice as long.
PUSH_WINDOW_S = 300
REPLAY_MEMORY_S = 2 * PUSH_WINDOW_S


class PushRefused(Exception):
    """A push not taken: HTTP status and a reason safe to log and answer."""

    def __init__(self, status: int, why: str):
        super().__init__(why)
        self.status, self.why = status, why


def parse_xml(data: bytes, what: str) -> dict[str, str]:
    """The child elements of a flat WeChat XML document, by tag. A document
    type declaration (and so any entity) is refused by the parser itself
    (defusedxml), whatever the document's encoding: no entity is expanded."""
    from xml.etree.ElementTree import ParseError

    import defusedxml.ElementTree as SafeElementTree  # only apps taking pushes parse XML
    from defusedxml import DefusedXmlException
    try:
        root = SafeElementTree.fromstring(data, forbid_dtd=True)
    except DefusedXmlException:
        raise PushRefused(400, f"{what}: XML declarations (DOCTYPE, ENTITY) are not accepted") from None
    except (ParseError, ValueError, RecursionError):
        raise PushRefused(400, f"{what} is not XML") from None
    return {child.tag: (child.text or "").strip() for child in root}


def parse_json(data: bytes, what: str) -> dict[str, Any]:
    """A JSON push. MsgIds above 2^53 stay exact: Python's ints are unbounded."""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        raise PushRefused(400, f"{what} is not JSON") from None
    if not isinstance(value, dict):
        raise PushRefused(400, f"{what} is not a JSON object")
    return value


def is_json(body: bytes) -> bool:
    return body.lstrip()[:1] == b"{"


def parse_message(data: bytes, what: str) -> dict[str, Any]:
    return parse_json(data, what) if is_json(data) else parse_xml(data, what)


def check_window(timestamp: str, now: float) -> None:
    """Unix seconds, written plainly (no leading zero), within the window.
    Plain digits make (timestamp, nonce) name one push: WeChat's signatures
    hash the sorted values joined with no separator, so a digit moved between
    timestamp and nonce would keep the signature, but it moves the timestamp
    tenfold, out of the window."""
    if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12) or \
            (timestamp[0] == "0" and timestamp != "0"):
        raise PushRefused(400, "push timestamp is not Unix seconds")
    if abs(now - int(timestamp)) > PUSH_WINDOW_S:
        raise PushRefused(403, f"push timestamp is more than {PUSH_WINDOW_S} s from now (a replay, "
                               "or this host's clock is off)")


def replay_keys(scope: str, timestamp: str, nonce: str, signed: str) -> tuple[str, str]:
    """The memories of pushes taken, both claimed for every push: its
    (timestamp, nonce) (DESIGN.md: a pair already seen is refused, whatever
    it carries), and its signature with what the signature covers (`signed`:
    a digit moved between timestamp and nonce keeps the signature, as WeChat
    joins the sorted values with no separator). The timestamp passed
    `check_window`."""
    def digest(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()[:32]
    return f"pushseen:{scope}:{timestamp}:{digest(nonce)}", f"pushsig:{scope}:{digest(signed)}"


REPLAYED = "push already taken (its timestamp and nonce, or its signature, were seen)"


async def first_time(store: Any, keys: tuple[str, ...]) -> bool:
    """Claim every replay memory of a push in the store (shared by every
    replica); False when one was claimed before: a replay. StoreUnavailable
    passes through."""
    for key in keys:
        if not await store.claim_once(key, REPLAY_MEMORY_S):
            return False
    return True


def check_plain_signature(token: str, signature: str, timestamp: str, nonce: str) -> None:
    if not signature or not same_signature(plain_signature(token, timestamp, nonce), signature):
        raise PushRefused(403, "push signature does not match (signature)")


def open_encrypted(crypto: MessageCrypto, body: bytes, msg_signature: str, timestamp: str,
                   nonce: str) -> tuple[bytes, str]:
    """(the decrypted message, the Encrypt value) of an encrypted push, its
    msg_signature and receive id checked first; PushRefused otherwise."""
    envelope = parse_message(body, "push body")
    encrypt = envelope.get("Encrypt")
    if not isinstance(encrypt, str) or not encrypt:
        raise PushRefused(400, "push body has no Encrypt element")
    return open_ciphertext(crypto, encrypt, msg_signature, timestamp, nonce, "push"), encrypt


def open_ciphertext(crypto: MessageCrypto, ciphertext: str, msg_signature: str, timestamp: str, nonce: str,
                    what: str) -> bytes:
    """A ciphertext WeChat signed with msg_signature (a push's Encrypt, WeCom's
    echostr): the signature, the decryption and the receive id checked."""
    if not msg_signature or not crypto.check_signature(msg_signature, timestamp, nonce, ciphertext):
        raise PushRefused(403, f"{what} signature does not match (msg_signature)")
    try:
        message, receive_id = crypto.decrypt(ciphertext)
    except CryptoError as exc:
        raise PushRefused(400, f"{what} does not decrypt: {exc}") from None
    if receive_id != crypto.appid:
        raise PushRefused(403, f"{what} was encrypted for another appid")
    return message
