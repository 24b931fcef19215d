#!/usr/bin/env python3
"""An independent Noise client for tidings, built on Python's `noiseprotocol`.

It proves that the tidings handshake and transport are standard Noise, not a
private dialect: nothing here comes from the Rust code, only from the
protocol as described below (section numbers refer to
`protocol-spec/README.md`).

Usage: xk_client.py PORT SERVER_PUBLIC_KEY_HEX

Against the tidings session on 127.0.0.1:PORT it

1. sends the 8-byte preamble (spec §2);
2. runs `Noise_XK_25519_ChaChaPoly_SHA256` as initiator (spec §4) with a
   fresh static key of its own, the server's static key pinned, the
   preamble as prologue and empty handshake payloads, each handshake
   message in a record: a 2-byte big-endian length, then the message
   (spec §3);
3. sends `Ping` as request 1 and expects `Pong` for request 1 (spec §5);
4. sends an unknown frame kind as request 2 and expects `Error` with code
   UNSUPPORTED for request 2 (spec §5, §7), on a connection that stays open;
5. rekeys its sending direction (spec §4.3: a record with an empty
   plaintext, then the standard Noise `REKEY`), sends `Ping` as request 4
   and expects `Pong` for request 4;
6. sends `Close` as request 5 and expects the server to hang up without a
   reply (spec §5.2).

Throughout, a record from the server with an empty plaintext is the
server's rekey marker, and is followed with the standard `REKEY` of the
receiving direction (spec §4.3).

On stdout it prints `client_static <hex>` (its own static public key), so
the caller can check that the server learnt it from the third handshake
message, and at the end `server_rekeys <n>`, how many rekey markers the
server sent.

Exit status: 0 on success; EXIT_FAILED with a message on stderr if the
server answered anything other than expected; EXIT_REFUSED if the server
closed the connection during the handshake without sending a single byte
(what a wrong pinned key must lead to, spec §4); EXIT_NO_NOISE if the
`noiseprotocol` package is not installed.
"""

import os
import socket
import sys

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_NO_NOISE = 4

try:
    from noise.connection import Keypair, NoiseConnection

    # `cryptography` comes with noiseprotocol; used only to show our own
    # static public key.
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
except ImportError as exc:
    print(
        f"xk_client: the Python package `noiseprotocol` is not installed for {sys.executable} ({exc}); "
        "run scripts/test, which installs it (noiseprotocol==0.3.1 in target/py) and sets TIDINGS_PYTHON",
        file=sys.stderr,
    )
    sys.exit(EXIT_NO_NOISE)

# spec §2: the preamble is the magic `TIDINGS` then the protocol version 1.
# spec §4: both sides also use it as the Noise prologue.
PREAMBLE = b"TIDINGS\x01"

# spec §4: the Noise protocol name.
NOISE_NAME = b"Noise_XK_25519_ChaChaPoly_SHA256"

# spec §3: every record is a 2-byte big-endian length, then that many bytes.
RECORD_HEADER_LEN = 2
# spec §3, §4.2: with empty payloads the three XK messages are
# `-> e, es` = 32 (e) + 16 (tag of the empty payload) = 48 bytes,
# `<- e, ee` = 32 + 16 = 48 bytes,
# `-> s, se` = 32 + 16 (encrypted s) + 16 (tag of the empty payload) = 64 bytes.
MSG1_LEN = 48
MSG2_LEN = 48
MSG3_LEN = 64

# spec §5: a transport record's plaintext is a postcard envelope: the request
# id as a varint(u32), then the frame's enum tag as a varint(u32), then the
# variant's fields.

# Request 1, ClientFrame tag 0 = Ping (spec §5.2).
PING_REQ_1 = bytes([0x01, 0x00])
# Request 1, ServerFrame tag 0 = Pong (spec §5.3).
PONG_REQ_1 = bytes([0x01, 0x00])

# Request 2, tag 99: no ClientFrame has it (spec §5: variants are
# append-only; an unknown kind is answered with UNSUPPORTED, and the
# connection stays open).
UNKNOWN_REQ_2 = bytes([0x02, 0x63])
# The answer: request 2, ServerFrame tag 3 = Error, code 2 = UNSUPPORTED
# (spec §7; the code is a varint(u16)), then the text: a varint length and
# that many bytes of UTF-8.
ERROR_UNSUPPORTED_REQ_2 = bytes([0x02, 0x03, 0x02])

# spec §4.3: a rekey marker is a transport record whose plaintext is empty
# (frames never are).
REKEY_MARKER = b""

# Request 4, Ping, and its Pong, after the client rekeyed.
PING_REQ_4 = bytes([0x04, 0x00])
PONG_REQ_4 = bytes([0x04, 0x00])

# Request 5, ClientFrame tag 2 = Close: the server closes without a reply
# (spec §5.2).
CLOSE_REQ_5 = bytes([0x05, 0x02])

TIMEOUT_SECONDS = 20


class Failed(Exception):
    """The server did something other than the protocol says."""


class Refused(Exception):
    """The server hung up during the handshake without sending anything."""


class Conn:
    """A socket that counts what it received and reads exact lengths."""

    def __init__(self, sock):
        self.sock = sock
        self.received = 0
        self.server_rekeys = 0

    def send(self, data):
        self.sock.sendall(data)

    def recv_exact(self, n, what):
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                if self.received == 0:
                    raise Refused(f"the server closed the connection, without sending anything, while {what} was due")
                raise Failed(f"the server closed the connection after {self.received} bytes while {what} was due")
            buf += chunk
            self.received += len(chunk)
        return bytes(buf)

    def send_record(self, body):
        # spec §3
        if len(body) > 0xFFFF:
            raise Failed(f"record body of {len(body)} bytes is too long")
        self.send(len(body).to_bytes(RECORD_HEADER_LEN, "big") + body)

    def recv_record(self, what):
        # spec §3
        header = self.recv_exact(RECORD_HEADER_LEN, what)
        n = int.from_bytes(header, "big")
        return self.recv_exact(n, what)

    def expect_eof(self, what):
        try:
            chunk = self.sock.recv(1)
        except ConnectionResetError:
            chunk = b""
        if chunk:
            raise Failed(f"expected the server to close after {what}, got more bytes")


def read_varint(data, pos):
    """A postcard varint(u32): LEB128, at most 5 bytes. Returns (value, next)."""
    value = 0
    for i in range(5):
        if pos >= len(data):
            raise Failed(f"truncated varint in {data.hex()}")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << (7 * i)
        if byte & 0x80 == 0:
            return value, pos
    raise Failed(f"varint too long in {data.hex()}")


def recv_frame(conn, noise, what):
    """The next frame's plaintext, following the peer's rekey markers."""
    while True:
        record = conn.recv_record(what)
        try:
            plain = noise.decrypt(record)
        except Exception as exc:  # noqa: BLE001 - any failure is a protocol failure
            raise Failed(f"a transport record from the server failed to decrypt while {what} was due: {exc!r}")
        if plain:
            return plain
        # spec §4.3: an empty plaintext is the sender's rekey marker.
        noise.rekey_inbound_cipher()
        conn.server_rekeys += 1


def run(port, server_public):
    noise = NoiseConnection.from_name(NOISE_NAME)
    noise.set_as_initiator()
    client_private = os.urandom(32)
    noise.set_keypair_from_private_bytes(Keypair.STATIC, client_private)
    noise.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, server_public)
    noise.set_prologue(PREAMBLE)
    noise.start_handshake()
    client_static = X25519PrivateKey.from_private_bytes(client_private).public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw
    )
    print(f"client_static {client_static.hex()}", flush=True)

    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_SECONDS)
    with sock:
        conn = Conn(sock)
        conn.send(PREAMBLE)

        # spec §4.2: -> e, es
        msg1 = noise.write_message(b"")
        if len(msg1) != MSG1_LEN:
            raise Failed(f"noiseprotocol wrote a first message of {len(msg1)} bytes, expected {MSG1_LEN}")
        conn.send_record(bytes(msg1))

        # <- e, ee
        msg2 = conn.recv_record("the second handshake message")
        if len(msg2) != MSG2_LEN:
            raise Failed(f"second handshake message is {len(msg2)} bytes, expected {MSG2_LEN}")
        try:
            payload = noise.read_message(msg2)
        except Exception as exc:  # noqa: BLE001
            raise Failed(f"the second handshake message failed: {exc!r}")
        if payload:
            raise Failed(f"second handshake message carries a payload ({bytes(payload).hex()}), expected none")

        # -> s, se
        msg3 = noise.write_message(b"")
        if len(msg3) != MSG3_LEN:
            raise Failed(f"noiseprotocol wrote a third message of {len(msg3)} bytes, expected {MSG3_LEN}")
        conn.send_record(bytes(msg3))
        if not noise.handshake_finished:
            raise Failed("noiseprotocol did not finish the handshake after three messages")

        # Ping -> Pong, same request id.
        conn.send_record(noise.encrypt(PING_REQ_1))
        got = recv_frame(conn, noise, "Pong")
        if got != PONG_REQ_1:
            raise Failed(f"answer to Ping is {got.hex()}, expected {PONG_REQ_1.hex()} (Pong for request 1)")

        # Unknown frame kind -> Error UNSUPPORTED, same request id.
        conn.send_record(noise.encrypt(UNKNOWN_REQ_2))
        got = recv_frame(conn, noise, "Error")
        prefix = ERROR_UNSUPPORTED_REQ_2
        if got[: len(prefix)] != prefix:
            raise Failed(
                f"answer to an unknown frame kind is {got.hex()}, expected it to start with {prefix.hex()} "
                "(Error UNSUPPORTED for request 2)"
            )
        text_len, pos = read_varint(got, len(prefix))
        if len(got) - pos != text_len:
            raise Failed(f"Error frame {got.hex()}: text length {text_len} but {len(got) - pos} bytes follow")
        try:
            got[pos:].decode("utf-8")
        except UnicodeDecodeError:
            raise Failed(f"Error frame {got.hex()}: text is not UTF-8")

        # Rekey our direction, then Ping -> Pong under the new key.
        conn.send_record(noise.encrypt(REKEY_MARKER))
        noise.rekey_outbound_cipher()
        conn.send_record(noise.encrypt(PING_REQ_4))
        got = recv_frame(conn, noise, "Pong after the client's rekey")
        if got != PONG_REQ_4:
            raise Failed(f"answer to Ping after rekeying is {got.hex()}, expected {PONG_REQ_4.hex()}")

        # Close: the server hangs up without a reply.
        conn.send_record(noise.encrypt(CLOSE_REQ_5))
        conn.expect_eof("Close")
        print(f"server_rekeys {conn.server_rekeys}", flush=True)


def main(argv):
    if len(argv) != 3:
        print(f"usage: {argv[0]} PORT SERVER_PUBLIC_KEY_HEX", file=sys.stderr)
        return EXIT_USAGE
    try:
        port = int(argv[1])
        server_public = bytes.fromhex(argv[2])
    except ValueError as exc:
        print(f"xk_client: bad argument: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if len(server_public) != 32:
        print("xk_client: the server key must be 32 bytes (64 hex digits)", file=sys.stderr)
        return EXIT_USAGE
    try:
        run(port, server_public)
    except Refused as exc:
        print(f"xk_client: handshake refused: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except Failed as exc:
        print(f"xk_client: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"xk_client: socket error: {exc!r}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv))
