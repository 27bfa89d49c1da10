"""WeChat's message signatures and encryption ("安全模式"): pushes from
WeChat to the sidecar (Official Account, Mini Program, WeCom, Open Platform)
and the encrypted passive replies sent back.

The scheme (Open Platform "Message Encryption and Decryption" guide; WeCom
document 90968 gives the same scheme and the test vector in
tests/test_platform.py):
  key        = base64(EncodingAESKey + "=")           -> 32 bytes; IV = key[:16]
  plaintext  = 16 random bytes + len(msg) as 4 bytes big-endian + msg + appid
  ciphertext = AES-256-CBC(PKCS#7 padded to a multiple of 32 bytes), base64
  msg_signature = SHA-1 hex of the sorted [token, timestamp, nonce, Encrypt] joined
The AES and the padding are the `cryptography` package's; nothing here is
hand-written crypto.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import struct

# WeChat pads to 32-byte blocks, not AES's 16 (PKCS#7 with k = 32).
PAD_BITS = 32 * 8


class CryptoError(Exception):
    """A push that does not decrypt into WeChat's layout; the message is safe to log."""


def aes_key(encoding_aes_key: str) -> bytes:
    """The AES key an EncodingAESKey (43 base64 characters) stands for."""
    if len(encoding_aes_key) != 43:
        raise ValueError(f"must be 43 characters, got {len(encoding_aes_key)}")
    try:
        key = base64.b64decode(encoding_aes_key + "=", validate=True)
    except binascii.Error:
        raise ValueError("is not base64") from None
    if len(key) != 32:
        raise ValueError("does not decode to 32 bytes")
    return key


def signature(token: str, timestamp: str, nonce: str, encrypt: str) -> str:
    """msg_signature: over the sorted token, timestamp, nonce and Encrypt (or WeCom's echostr)."""
    return hashlib.sha1("".join(sorted((token, timestamp, nonce, encrypt))).encode()).hexdigest()


def plain_signature(token: str, timestamp: str, nonce: str) -> str:
    """signature: over the sorted token, timestamp and nonce only (URL
    verification, plaintext pushes: it does not cover the body)."""
    return hashlib.sha1("".join(sorted((token, timestamp, nonce))).encode()).hexdigest()


def same_signature(expected: str, given: str) -> bool:
    """Constant-time, any case."""
    return hmac.compare_digest(expected.encode(), given.lower().encode("ascii", "replace"))


class MessageCrypto:
    def __init__(self, token: str, encoding_aes_key: str, appid: str):
        # Imported here: only a platform app with pushes needs OpenSSL's
        # bindings (a few MiB of RSS every other sidecar does without).
        from cryptography.hazmat.primitives import padding
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
        self.token = token
        self.key = aes_key(encoding_aes_key)
        self.appid = appid
        self._padding = padding
        self._cipher_parts = (Cipher, algorithms.AES, modes.CBC)

    def _cipher(self):  # type: ignore[no-untyped-def]
        cipher, aes, cbc = self._cipher_parts
        return cipher(aes(self.key), cbc(self.key[:16]))

    def check_signature(self, msg_signature: str, timestamp: str, nonce: str, encrypt: str) -> bool:
        return same_signature(signature(self.token, timestamp, nonce, encrypt), msg_signature)

    def reply(self, message: bytes, timestamp: str, nonce: str, as_json: bool) -> bytes:
        """An encrypted passive reply in WeChat's envelope: XML
        <xml><Encrypt/><MsgSignature/><TimeStamp/><Nonce/></xml>, or for a
        JSON push {"Encrypt", "MsgSignature", "TimeStamp" (a number), "Nonce"}."""
        encrypt = self.encrypt(message)
        sig = signature(self.token, timestamp, nonce, encrypt)
        if as_json:
            import json
            return json.dumps({"Encrypt": encrypt, "MsgSignature": sig, "TimeStamp": int(timestamp),
                               "Nonce": nonce}).encode()
        return (f"<xml><Encrypt><![CDATA[{encrypt}]]></Encrypt><MsgSignature><![CDATA[{sig}]]></MsgSignature>"
                f"<TimeStamp>{timestamp}</TimeStamp><Nonce><![CDATA[{nonce}]]></Nonce></xml>").encode()

    def decrypt(self, encrypt: str) -> tuple[bytes, str]:
        """(message, the appid it was encrypted for)."""
        try:
            data = base64.b64decode(encrypt, validate=True)
        except (binascii.Error, ValueError):
            raise CryptoError("Encrypt is not base64") from None
        if not data or len(data) % 16:
            raise CryptoError("Encrypt is not a whole number of AES blocks")
        decryptor = self._cipher().decryptor()
        padded = decryptor.update(data) + decryptor.finalize()
        unpadder = self._padding.PKCS7(PAD_BITS).unpadder()
        try:
            plain = unpadder.update(padded) + unpadder.finalize()
        except ValueError:
            raise CryptoError("bad padding after decryption (wrong encoding_aes_key?)") from None
        if len(plain) < 20:
            raise CryptoError("decrypted text too short")
        (length,) = struct.unpack(">I", plain[16:20])
        if 20 + length > len(plain):
            raise CryptoError("decrypted length field runs past the text")
        appid = plain[20 + length:].decode("utf-8", "replace")
        return plain[20:20 + length], appid

    def encrypt(self, message: bytes, random: bytes | None = None) -> str:
        """WeChat's side of the scheme (the simulator's pushes, the tests)."""
        plain = (random or os.urandom(16)) + struct.pack(">I", len(message)) + message + self.appid.encode()
        padder = self._padding.PKCS7(PAD_BITS).padder()
        padded = padder.update(plain) + padder.finalize()
        encryptor = self._cipher().encryptor()
        return base64.b64encode(encryptor.update(padded) + encryptor.finalize()).decode()
