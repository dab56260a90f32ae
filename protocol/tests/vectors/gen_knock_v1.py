#!/usr/bin/env python3
"""Independent reference implementation of the Postern SPA wire format v1 (seal side).

Generates protocol/tests/vectors/knock_v1.json from fixed inputs using the Python
`cryptography` package (not the Rust code), so the Rust known-answer test checks the
crate against a second implementation byte for byte.

    python3 protocol/tests/vectors/gen_knock_v1.py > protocol/tests/vectors/knock_v1.json
"""
import base64
import hashlib
import ipaddress
import json
import struct

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

RAW = serialization.Encoding.Raw
RAWPUB = serialization.PublicFormat.Raw


def seq(start, n=32):
    return bytes((start + i) % 256 for i in range(n))


def seal(v):
    dev = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(v["device_seed"]))
    dev_pub = dev.public_key().public_bytes(RAW, RAWPUB)
    device_id = hashlib.sha256(dev_pub).digest()[:16]
    gw = X25519PrivateKey.from_private_bytes(bytes.fromhex(v["gateway_secret"]))
    gw_pub = gw.public_key().public_bytes(RAW, RAWPUB)
    key_id = hashlib.sha256(gw_pub).digest()[:8]
    eph = X25519PrivateKey.from_private_bytes(bytes.fromhex(v["ephemeral_secret"]))
    eph_pub = eph.public_key().public_bytes(RAW, RAWPUB)
    shared = eph.exchange(X25519PublicKey.from_public_bytes(gw_pub))
    assert shared != bytes(32)

    header = bytes([1, 1]) + key_id + eph_pub
    assert len(header) == 42
    app = v["app"].encode()
    inner = device_id + struct.pack(">Q", v["timestamp_ms"]) + bytes.fromhex(v["nonce"])
    inner += bytes([v["flags"], len(app)]) + app
    if v["claimed_addr"] is None:
        inner += b"\x00"
    else:
        a = ipaddress.ip_address(v["claimed_addr"])
        inner += bytes([a.version]) + a.packed
    inner += bytes.fromhex(v["posture_digest"])
    sig = dev.sign(b"postern spa v1 sig" + header + inner)
    inner += sig

    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"postern spa v1",
               info=header + gw_pub).derive(shared)
    ct = ChaCha20Poly1305(key).encrypt(bytes(12), inner, header)
    out = dict(v)
    out.update({
        "device_public": "ed25519:" + base64.b64encode(dev_pub).decode(),
        "device_id": device_id.hex(),
        "gateway_public": "x25519:" + base64.b64encode(gw_pub).decode(),
        "gateway_key_id": key_id.hex(),
        "ephemeral_public": eph_pub.hex(),
        "aead_key": key.hex(),
        "signature": sig.hex(),
        "datagram": (header + ct).hex(),
        "datagram_len": len(header) + len(ct),
    })
    return out


VECTORS = [
    {
        "name": "knock ssh ipv4",
        "device_seed": seq(0x00).hex(),
        "gateway_secret": seq(0x20).hex(),
        "ephemeral_secret": seq(0x40).hex(),
        "nonce": seq(0x60, 16).hex(),
        "timestamp_ms": 1767225600000,
        "flags": 1,
        "app": "ssh",
        "claimed_addr": "192.0.2.10",
        "posture_digest": bytes(32).hex(),
    },
    {
        "name": "renew+close long app ipv6 posture",
        "device_seed": seq(0x80).hex(),
        "gateway_secret": seq(0xa0).hex(),
        "ephemeral_secret": seq(0xc0).hex(),
        "nonce": seq(0xe0, 16).hex(),
        "timestamp_ms": 1767225612345,
        "flags": 6,
        "app": "internal-wiki.prod_eu-1." + "x" * 40,
        "claimed_addr": "2001:db8::1:2",
        "posture_digest": seq(0x11).hex(),
    },
    {
        "name": "knock one-byte app no address",
        "device_seed": seq(0x05).hex(),
        "gateway_secret": seq(0x25).hex(),
        "ephemeral_secret": seq(0x45).hex(),
        "nonce": bytes(16).hex(),
        "timestamp_ms": 0,
        "flags": 1,
        "app": "a",
        "claimed_addr": None,
        "posture_digest": bytes(32).hex(),
    },
]

if __name__ == "__main__":
    print(json.dumps({"version": 1, "vectors": [seal(v) for v in VECTORS]}, indent=2))
