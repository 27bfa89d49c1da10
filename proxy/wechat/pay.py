"""WeChat Pay API v3's own algorithms, pure (wechat-pay-notes.md §1-§8):
request signatures (WECHATPAY2-SHA256-RSA2048), answer and notification
verification, AEAD_AES_256_GCM (certificates and notification resources),
RSA-OAEP for sensitive fields, and the pay parameters pages need. RSA, SHA-256
and AES-GCM are the `cryptography` package's; nothing here is hand-written
crypto.
"""
from __future__ import annotations

import base64
import binascii
import functools
import secrets
from typing import Any

SCHEME = "WECHATPAY2-SHA256-RSA2048"

# WeChat Pay's signature probes start with this and must never verify (§2).
PROBE_PREFIX = "WECHATPAY/SIGNTEST/"


class PayCryptoError(Exception):
    """A signature, key or ciphertext that does not hold; safe to log."""


def message(*lines: str) -> bytes:
    """The signed string: each line ending in \\n, the last one too."""
    return "".join(f"{line}\n" for line in lines).encode("utf-8")


def load_private_key(pem: bytes) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise PayCryptoError(f"not a PEM private key ({exc.__class__.__name__})") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise PayCryptoError("not an RSA private key")
    return key


def load_public_key(pem: bytes) -> Any:
    """A WeChat Pay public key (SubjectPublicKeyInfo PEM) or a certificate's."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    try:
        if b"BEGIN CERTIFICATE" in pem:
            key = x509.load_pem_x509_certificate(pem).public_key()
        else:
            key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise PayCryptoError(f"not a PEM public key or certificate ({exc.__class__.__name__})") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise PayCryptoError("not an RSA public key")
    return key


@functools.cache
def _pkcs1_sha256() -> tuple[Any, Any, type[Exception]]:
    """(padding, hash, the verify failure), made once: a Pay call signs and
    verifies, and `cryptography` is imported only where Pay is used."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    return padding.PKCS1v15(), hashes.SHA256(), InvalidSignature


def sign(private_key: Any, data: bytes) -> str:
    """base64(RSA PKCS#1 v1.5 with SHA-256)."""
    pkcs1, sha256, _ = _pkcs1_sha256()
    return base64.b64encode(private_key.sign(data, pkcs1, sha256)).decode()


def verify(public_key: Any, data: bytes, signature: str) -> bool:
    pkcs1, sha256, invalid = _pkcs1_sha256()
    if not signature or signature.startswith(PROBE_PREFIX):
        return False
    try:
        raw = base64.b64decode(signature, validate=True)
        public_key.verify(raw, data, pkcs1, sha256)
    except (invalid, binascii.Error, ValueError):
        return False
    return True


def authorization(private_key: Any, mchid: str, serial_no: str, method: str, url: str, body: bytes,
                  timestamp: int, nonce: str | None = None) -> str:
    """The Authorization header of one request: `url` is the path and query
    as sent, `body` the bytes sent (empty for GET)."""
    nonce = nonce or secrets.token_hex(16)
    data = f"{method}\n{url}\n{timestamp}\n{nonce}\n".encode() + body + b"\n"
    sig = sign(private_key, data)
    return (f'{SCHEME} mchid="{mchid}",nonce_str="{nonce}",signature="{sig}",'
            f'timestamp="{timestamp}",serial_no="{serial_no}"')


def answer_message(timestamp: str, nonce: str, body: bytes) -> bytes:
    """What an answer's or a notification's Wechatpay-Signature covers."""
    return f"{timestamp}\n{nonce}\n".encode() + body + b"\n"


def aead_decrypt(apiv3_key: bytes, nonce: str, associated_data: str, ciphertext: str) -> bytes:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    try:
        return AESGCM(apiv3_key).decrypt(nonce.encode(), base64.b64decode(ciphertext, validate=True),
                                         associated_data.encode() if associated_data else None)
    except (InvalidTag, binascii.Error, ValueError):
        raise PayCryptoError("AEAD_AES_256_GCM: does not decrypt with the APIv3 key") from None


def aead_encrypt(apiv3_key: bytes, nonce: str, associated_data: str, plaintext: bytes) -> str:
    """WeChat Pay's side (the simulator)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    return base64.b64encode(AESGCM(apiv3_key).encrypt(nonce.encode(), plaintext,
                                                      associated_data.encode() if associated_data else None)).decode()


def oaep_encrypt(public_key: Any, plaintext: str) -> str:
    """A sensitive field for WeChat Pay: RSAES-OAEP, SHA-1 and MGF1-SHA-1 (§7)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    return base64.b64encode(public_key.encrypt(plaintext.encode("utf-8"), padding.OAEP(
        mgf=padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(), label=None))).decode()
