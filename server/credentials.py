"""Who may talk to a shard's data-plane socket: the run's credentials and the ZAP handler that checks them.

The driver makes ``RunCredentials`` once per run (``RunCredentials.new``) and hands them to the shards and the
clients through Ray, whose own channel is token-authenticated; no credential is ever written to disk.

* default, ``encrypt=False``: ZeroMQ's PLAIN mechanism with a 256-bit random per-run secret as the password,
  checked by a ZAP handler on every new connection (``hmac.compare_digest``). This is Ray's own token model:
  it keeps out anyone who does not hold the run's secret, but the secret and the data travel in clear, so
  someone who can read the network between nodes can read them (as with Ray without TLS).
* ``encrypt=True``: CURVE (Curve25519 + XSalsa20-Poly1305). The run has one server key pair (all its
  shards) and one client key pair (all its members); the ZAP handler admits only the run's client public key.
  Traffic is encrypted and authenticated; the price is measured in BENCHMARKS.md.

A connection that fails the handshake (no credentials, wrong ones, wrong mechanism, garbage bytes) never
reaches the shard's logic: ZeroMQ drops it. The shard counts such attempts (socket monitor) and logs the
first one.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass

import zmq
import zmq.utils.z85  # not imported by `import zmq` (pyzmq 27)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"rayps"
PLAIN_USER = b"rayps"


@dataclass(frozen=True)
class RunCredentials:
    secret: bytes
    encrypt: bool = False
    server_public: bytes = b""
    server_secret: bytes = b""
    client_public: bytes = b""
    client_secret: bytes = b""

    @classmethod
    def new(cls, encrypt: bool = False) -> "RunCredentials":
        if not isinstance(encrypt, bool):
            raise ValueError(f"encrypt must be True or False, got {encrypt!r}")
        if not encrypt:
            return cls(secrets.token_hex(32).encode())
        if not zmq.has("curve"):
            raise RuntimeError("encrypt=True needs libzmq built with CURVE (libsodium); this pyzmq has none")
        server_public, server_secret = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        return cls(secrets.token_hex(32).encode(), True, server_public, server_secret, client_public, client_secret)

    def __repr__(self) -> str:  # never print a secret
        return f"RunCredentials(encrypt={self.encrypt})"

    def configure_server(self, socket: zmq.Socket) -> None:
        socket.zap_domain = ZAP_DOMAIN
        if self.encrypt:
            socket.curve_server = True
            socket.curve_secretkey = self.server_secret
            socket.curve_publickey = self.server_public
        else:
            socket.plain_server = True

    def configure_client(self, socket: zmq.Socket) -> None:
        if self.encrypt:
            socket.curve_serverkey = self.server_public
            socket.curve_publickey = self.client_public
            socket.curve_secretkey = self.client_secret
        else:
            socket.plain_username = PLAIN_USER
            socket.plain_password = self.secret

    def admits(self, domain: bytes, mechanism: bytes, credentials: list) -> bool:
        """Does this ZAP request carry the run's credentials?"""
        if domain != ZAP_DOMAIN:
            return False
        if self.encrypt:
            return mechanism == b"CURVE" and len(credentials) == 1 and hmac.compare_digest(
                credentials[0], self.client_public_raw)
        return (mechanism == b"PLAIN" and len(credentials) == 2 and credentials[0] == PLAIN_USER
                and hmac.compare_digest(credentials[1], self.secret))

    @property
    def client_public_raw(self) -> bytes:
        """The client public key as ZAP hands it over: 32 raw bytes (the key pair is Z85 text)."""
        return zmq.utils.z85.decode(self.client_public)


class ZapHandler:
    """The ZAP endpoint of one ZeroMQ context (RFC 27), polled by the shard's data-plane thread."""

    def __init__(self, context: zmq.Context, credentials: RunCredentials):
        self.credentials = credentials
        self.socket = context.socket(zmq.REP)
        self.socket.linger = 0
        self.socket.bind(ZAP_ENDPOINT)
        self.denied = 0

    def handle(self) -> None:
        """Answer one pending ZAP request (call when the socket is readable)."""
        frames = self.socket.recv_multipart()
        if len(frames) < 6:
            self.socket.send_multipart([b"1.0", b"", b"500", b"malformed ZAP request", b"", b""])
            return
        version, request_id, domain, _address, _identity, mechanism, *credentials = frames
        if version == b"1.0" and self.credentials.admits(domain, mechanism, credentials):
            self.socket.send_multipart([version, request_id, b"200", b"OK", b"member", b""])
        else:
            self.denied += 1
            self.socket.send_multipart([b"1.0", request_id, b"400", b"not a member of this run", b"", b""])

    def close(self) -> None:
        self.socket.close(linger=0)
