"""The real network's parts for egress tests, on loopback: a small HTTP
CONNECT proxy (as a corporate egress is), a test CA that issues WeChat's
host names, and the simulator behind TLS with such a certificate."""
from __future__ import annotations

import asyncio
import base64
import datetime
import ssl
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


class ConnectProxy:
    """CONNECT host:port -> the address `routes` maps it to (the proxy, not
    the sidecar, knows where WeChat is); 407 without the right credentials
    when `credentials` is set; 502 for a host it cannot reach."""

    def __init__(self, routes: dict[tuple[str, int], tuple[str, int]], credentials: tuple[str, str] | None = None):
        self.routes, self.credentials = routes, credentials
        self.seen: list[tuple[str, bool]] = []         # (CONNECT target, credentials given)
        self.refuse_with: int | None = None
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> "ConnectProxy":
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    def url(self, user: str | None = None, password: str | None = None) -> str:
        auth = f"{user}:{password}@" if user is not None else ""
        return f"http://{auth}127.0.0.1:{self.port}"

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:] if l)}
            given = headers.get("proxy-authorization", "")
            ok_auth = self.credentials is None or given == "Basic " + base64.b64encode(
                f"{self.credentials[0]}:{self.credentials[1]}".encode()).decode()
            self.seen.append((target, bool(given)))
            if method != "CONNECT":
                await self._forward(method, target, lines, reader, writer)
                return
            if not ok_auth:
                writer.write(b'HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm="corp"'
                             b"\r\nContent-Length: 0\r\n\r\n")
                return
            if self.refuse_with is not None:
                writer.write(b"HTTP/1.1 %d Refused\r\nContent-Length: 0\r\n\r\n" % self.refuse_with)
                return
            host, _, port = target.rpartition(":")
            route = self.routes.get((host.strip("[]"), int(port)))
            try:
                if route is None:
                    raise OSError("no route")
                up_reader, up_writer = await asyncio.open_connection(*route)
            except OSError:
                writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                return
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()


    async def _forward(self, method: str, target: str, lines: list[str], reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        """An absolute-form request (what HTTP clients send a proxy for an
        http:// URL): sent on to the mapped host in origin form, and the
        rest of the connection piped."""
        parts = urlsplit(target)
        route = self.routes.get((parts.hostname or "", parts.port or 80))
        if parts.scheme != "http" or route is None:
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            return
        up_reader, up_writer = await asyncio.open_connection(*route)
        origin = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        kept = [l for l in lines[1:] if l and not l.lower().startswith("proxy-")]
        up_writer.write(f"{method} {origin} HTTP/1.1\r\n".encode("latin-1")
                        + "".join(f"{l}\r\n" for l in kept).encode("latin-1") + b"\r\n")
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


class CertAuthority:
    """A CA made for this test run, and leaf certificates it issues."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "wts test CA")])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.ca_file = directory / "corp-ca.pem"
        self.ca_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def server_context(self, *names: str) -> ssl.SSLContext:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
                .issuer_name(self.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
                .sign(self.key, hashes.SHA256()))
        stem = self.directory / names[0]
        cert_path, key_path = stem.with_suffix(".crt"), stem.with_suffix(".key")
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert_path, key_path)
        return context


async def serve_tls(app: web.Application, context: ssl.SSLContext) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
    return runner, runner.addresses[0][1]
