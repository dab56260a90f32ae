#!/usr/bin/env python3
"""Writes the hand-made seed inputs of every fuzz target into fuzz/corpus/<target>/seed-*.

Valid examples only, built from real data: the knock datagrams of the known-answer vectors
(protocol/tests/vectors/knock_v1.json), those datagrams inside real IPv4/IPv6 UDP packets,
the gateway config from README.md, real sync request/reply lines and snapshots, and the
text form of every key type. The fuzzer's own finds are added next to them by scripts/fuzz
(and minimized with `cargo fuzz cmin`). Run from anywhere: python3 fuzz/seeds/make_seeds.py
"""
import base64
import json
import os
import struct

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")
VECTORS = json.load(open(os.path.join(ROOT, "protocol", "tests", "vectors", "knock_v1.json")))["vectors"]
SPA_PORT = 62201


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def udp(payload, sport=40000, dport=SPA_PORT):
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def ipv4(payload, src=(192, 0, 2, 10), dst=(198, 51, 100, 1), options=b""):
    ihl = 5 + len(options) // 4
    hdr = struct.pack("!BBHHHBBH4B4B", 0x40 | ihl, 0, 4 * ihl + len(payload), 0x1234, 0x4000,
                      64, 17, 0, *src, *dst) + options
    hdr = hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]
    return hdr + payload


def ipv6(payload, src="fd00000000000000000000000000000a", dst="fd000000000000000000000000000001"):
    return (struct.pack("!IHBB", 6 << 28, len(payload), 17, 64)
            + bytes.fromhex(src) + bytes.fromhex(dst) + payload)


datagrams = [bytes.fromhex(v["datagram"]) for v in VECTORS]

# spa_open: the three known-answer knocks (each opens and verifies under its own vector's keys).
for i, d in enumerate(datagrams):
    write("spa_open", "kat%d" % i, d)

# capture_ip: knocks as sniff mode captures them (starting at the IP header).
write("capture_ip", "v4-kat0", ipv4(udp(datagrams[0])))
write("capture_ip", "v4-options-kat2", ipv4(udp(datagrams[2]), options=b"\x01\x01\x01\x00"))
write("capture_ip", "v6-kat1", ipv6(udp(datagrams[1])))
write("capture_ip", "v4-other-port", ipv4(udp(b"hello", dport=53)))
write("capture_ip", "v6-empty-payload", ipv6(udp(b"")))

# gateway_config: the README's full example and the smallest valid shapes.
write("gateway_config", "readme", """key_file = "/etc/postern/gateway.key"
capture = "sniff"            # or "udp" (a bound socket on spa_port)
interface = "any"            # sniff mode: interface name or "any"
spa_port = 62201
listen = "::"                # udp mode bind address
controller_socket = "/run/postern/controller.sock"
audit_log = "-"              # "-" = stdout, else a file (appended, one JSON line per decision)
max_skew_secs = 30
pinhole_secs = 30            # knock window: new connections admitted
session_secs = 3600          # admitted flows live this long
table = "postern"
open_ports = []              # left reachable without a knock, e.g. ["tcp/22"]
""")
write("gateway_config", "minimal", 'key_file = "/root"\ncontroller_socket = "/run/c.sock"\n')
write("gateway_config", "udp", 'key_file = "/root"\ncontroller_socket = "/run/c.sock"\n'
      'capture = "udp"\nlisten = "192.0.2.1"\nspa_port = 4000\naudit_log = "/var/log/postern/audit.log"\n'
      'open_ports = ["tcp/22", "udp/53"]\ninterface = "eth0"\ntable = "postern_test-1"\n')

# sync_messages: request lines, reply lines and a snapshot with the vectors' devices.
devices = [{"id": v["device_id"], "name": "dev%d" % i, "user": "alice" if i else "bob",
            "public_key": v["device_public"], "revoked": i == 2} for i, v in enumerate(VECTORS)]
snapshot = {"revision": 7, "devices": devices,
            "apps": [{"name": "ssh", "protocol": "tcp", "port": 22},
                     {"name": "dns", "protocol": "udp", "port": 53}],
            "grants": [{"app": "ssh", "user": "alice"}, {"app": "dns", "user": "bob"}]}
write("sync_messages", "request", '{"after_revision": 4}')
write("sync_messages", "request-empty", "{}")
write("sync_messages", "request-null", '{"after_revision":null}')
write("sync_messages", "snapshot", json.dumps(snapshot))
write("sync_messages", "reply-snapshot", json.dumps({"snapshot": snapshot}))
write("sync_messages", "reply-error", '{"error":"too many connections"}')

# key_text: every key type's text form, as printed by the tools.
b64 = lambda b: base64.b64encode(b).decode()
v = VECTORS[0]
write("key_text", "device-public", v["device_public"])
write("key_text", "gateway-public", v["gateway_public"] + "\n")
write("key_text", "device-secret", "postern-device-secret:v1:" + b64(bytes.fromhex(v["device_seed"])))
write("key_text", "gateway-secret", "postern-gateway-secret:v1:" + b64(bytes.fromhex(v["gateway_secret"])) + "\n")
write("key_text", "device-id", v["device_id"])

# api_auth: request-signature header values (device, timestamp, nonce, signature; one per
# line) and an invite token, in the forms the client sends and the controller prints.
write("api_auth", "headers", "\n".join([v["device_id"], "1767225600", "ab" * 16, "cd" * 64]))
write("api_auth", "invite", "postern-invite:v1:" + base64.urlsafe_b64encode(bytes(range(32))).decode().rstrip("=") + ":" + "5e" * 32)

# policy_file: the full example of docs/policy.md (the first ```toml block).
doc = open(os.path.join(ROOT, "docs", "policy.md")).read()
start = doc.index("```toml\n") + len("```toml\n")
write("policy_file", "docs-example", doc[start:doc.index("```", start)])

# posture_report: a full report as the client sends it, the smallest valid one, and a few
# refused shapes (unknown field, repeated custom check, bad timestamp).
write("posture_report", "full", json.dumps({
    "collected_at": "2026-11-23T13:00:00Z",
    "os_family": "linux",
    "os_version": "24.04",
    "kernel": "6.8.0-49-generic",
    "last_package_update": "2026-11-20T08:15:00+01:00",
    "disk_encrypted": True,
    "firewall_on": True,
    "processes": ["falcon-sensor", "sshd"],
    "mdm_enrolled": False,
    "custom": {"screen_lock": True, "usb_storage_blocked": False},
}, indent=2))
write("posture_report", "minimal", '{"collected_at":"2026-11-23T13:00:00Z"}')
write("posture_report", "unknown-field", '{"collected_at":"2026-11-23T13:00:00Z","antivirus":true}')
write("posture_report", "repeated-check", '{"collected_at":"2026-11-23T13:00:00Z","custom":{"a":true,"a":false}}')
write("posture_report", "bad-time", '{"collected_at":"2026-02-30T25:00:00Z","kernel":"6.1"}')

# reply_open: signed replies to known-answer knock 0 (docs/protocol.md §11), sealed here by
# an independent implementation (Python `cryptography`); the Rust client opens them
# (tests/tests/fuzz_corpus.rs checks their contents).
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives import hashes


def seal_reply(vector, salt, decision, reason, message, remediation, session_secs):
    gw = X25519PrivateKey.from_private_bytes(bytes.fromhex(vector["gateway_secret"]))
    knock = bytes.fromhex(vector["datagram"])
    knock_header, nonce = knock[:42], bytes.fromhex(vector["nonce"])
    gw_pub = base64.b64decode(vector["gateway_public"].split(":", 1)[1])
    header = bytes([1, 2]) + bytes.fromhex(vector["gateway_key_id"]) + salt
    aad = header + knock_header + nonce
    shared = gw.exchange(X25519PublicKey.from_public_bytes(knock_header[10:42]))
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"postern spa v1 reply",
               info=aad + gw_pub).derive(shared)
    m, r = message.encode(), remediation.encode()
    inner = (bytes([decision, len(reason)]) + reason.encode()
             + struct.pack("!H", len(m)) + m + struct.pack("!H", len(r)) + r
             + struct.pack("!I", session_secs))
    return header + ChaCha20Poly1305(key).encrypt(bytes(12), inner, aad)


write("reply_open", "deny-posture", seal_reply(
    VECTORS[0], bytes(range(0x70, 0x80)), 1, "policy_denied", "disk encryption required",
    "enable LUKS on / and /home, see https://wiki.example.org/luks", 0))
write("reply_open", "deny-minimal", seal_reply(VECTORS[0], bytes(16), 1, "x", "", "", 0))
write("reply_open", "allow-ack", seal_reply(
    VECTORS[0], bytes(range(0x90, 0xa0)), 2, "granted", "", "", 3600))
