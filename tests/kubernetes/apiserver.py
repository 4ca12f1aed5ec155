#!/usr/bin/env python3
"""Plays kube-apiserver against kmsd's Kubernetes KMS v2 plugin socket.

A client of another gRPC stack than kmsd's (grpcio, stubs generated here
from daemon/proto/kms_v2.proto with grpc_tools.protoc), driven by
tests/tests/e2e/kubernetes.rs. Subcommands:

  scenario  poll Status, encrypt DEK seeds, rotate the key with kmsctl and
            see key_id change, decrypt everything made before, see Status
            fail while the key is disabled and recover once enabled, check
            the size limits and that altered input is refused; save what
            was sealed (--save) for the other subcommands
  reopen    decrypt everything saved (after kmsd was killed and restarted)
  denied    as a uid the key's policy does not admit: every call refused

Exits non-zero with a message on the first broken expectation.
"""

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import time

MAX_CIPHERTEXT = 1024
MAX_ANNOTATIONS = 32 * 1024
MAX_PLAINTEXT = 512


def fail(msg):
    print(f"apiserver.py: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def check(cond, msg):
    if not cond:
        fail(msg)


def stubs(proto):
    """Generates the v2 stubs into a temporary folder and imports them."""
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="kms-v2-stubs-")
    folder, name = os.path.split(os.path.abspath(proto))
    rc = protoc.main(
        [
            "protoc",
            f"-I{folder}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            os.path.join(folder, name),
        ]
    )
    check(rc == 0, f"grpc_tools.protoc failed on {proto}")
    sys.path.insert(0, out)
    module = os.path.splitext(name)[0]
    pb = __import__(f"{module}_pb2")
    grpc_pb = __import__(f"{module}_pb2_grpc")
    return pb, grpc_pb


class Apiserver:
    def __init__(self, args):
        import grpc

        self.grpc = grpc
        self.pb, grpc_pb = stubs(args.proto)
        self.channel = grpc.insecure_channel(f"unix://{os.path.abspath(args.socket)}")
        self.kms = grpc_pb.KeyManagementServiceStub(self.channel)
        self.args = args
        self.uid = 0

    def next_uid(self):
        self.uid += 1
        return f"req-{os.getpid()}-{self.uid}"

    def status(self):
        return self.kms.Status(self.pb.StatusRequest(), timeout=10)

    def encrypt(self, plaintext):
        return self.kms.Encrypt(self.pb.EncryptRequest(plaintext=plaintext, uid=self.next_uid()), timeout=10)

    def decrypt(self, ciphertext, key_id, annotations):
        req = self.pb.DecryptRequest(ciphertext=ciphertext, uid=self.next_uid(), key_id=key_id)
        for k, v in annotations.items():
            req.annotations[k] = v
        return self.kms.Decrypt(req, timeout=10).plaintext

    def refused(self, call, code, what):
        """Runs call(), which must fail with gRPC status `code`."""
        try:
            call()
        except self.grpc.RpcError as e:
            check(e.code() == code, f"{what}: expected {code}, got {e.code()}: {e.details()}")
            return e.details()
        fail(f"{what}: accepted")

    def kmsctl(self, *argv):
        cmd = [self.args.kmsctl, "--socket", self.args.kmsd_socket, *argv]
        r = subprocess.run(cmd, capture_output=True, timeout=60)
        check(r.returncode == 0, f"{' '.join(cmd)}: {r.stderr.decode(errors='replace')}")

    def healthy(self):
        s = self.status()
        check(s.version == "v2", f"Status version {s.version!r}")
        check(s.healthz == "ok", f"Status healthz {s.healthz!r}")
        check(0 < len(s.key_id) <= 1024, f"Status key_id {s.key_id!r}")
        return s.key_id

    def wait_key_id_change(self, old):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            new = self.healthy()
            if new != old:
                return new
            time.sleep(0.05)
        fail(f"key_id stayed {old!r} after a rotation")

    def seal(self, key_id, n):
        """Encrypts n DEK seeds as kube-apiserver does; checks the answer."""
        made = []
        for _ in range(n):
            seed = os.urandom(32)
            r = self.encrypt(seed)
            check(r.key_id == key_id, f"Encrypt key_id {r.key_id!r}, Status said {key_id!r}")
            check(0 < len(r.ciphertext) <= MAX_CIPHERTEXT, f"ciphertext of {len(r.ciphertext)} bytes")
            check(seed not in r.ciphertext, "the seed shows in its ciphertext")
            size = sum(len(k) + len(v) for k, v in r.annotations.items())
            check(size < MAX_ANNOTATIONS, f"annotations of {size} bytes")
            for k in r.annotations:
                labels = k.split(".")
                check(len(labels) >= 2 and all(labels), f"annotation key {k!r} is not fully qualified")
            made.append(
                {"seed": seed, "ciphertext": r.ciphertext, "key_id": r.key_id, "annotations": dict(r.annotations)}
            )
        return made

    def reopen(self, made):
        for m in made:
            got = self.decrypt(m["ciphertext"], m["key_id"], m["annotations"])
            check(got == m["seed"], f"Decrypt under {m['key_id']} gave other bytes")


def scenario(api, args):
    g = api.grpc.StatusCode
    key_ids = [api.healthy()]
    made = api.seal(key_ids[-1], 4)
    api.reopen(made)
    print(f"status ok, key_id {key_ids[0]}, 4 seeds sealed and opened")

    # Rotations: each gives a key_id never seen before; everything made
    # earlier still decrypts.
    for _ in range(2):
        api.kmsctl("key", "rotate", args.key)
        key_ids.append(api.wait_key_id_change(key_ids[-1]))
        check(key_ids[-1] not in key_ids[:-1], f"key_id {key_ids[-1]} reused")
        made += api.seal(key_ids[-1], 3)
        api.reopen(made)
    print(f"rotated twice: key_ids {key_ids}; {len(made)} ciphertexts of 3 versions open")

    # Altered input is an error, never other bytes.
    m = made[0]
    flipped = bytearray(m["ciphertext"])
    flipped[-1] ^= 1
    api.refused(lambda: api.decrypt(bytes(flipped), m["key_id"], m["annotations"]), g.INVALID_ARGUMENT, "flipped tag")
    body = bytearray(m["ciphertext"])
    body[40] ^= 0x80
    api.refused(lambda: api.decrypt(bytes(body), m["key_id"], m["annotations"]), g.INVALID_ARGUMENT, "flipped body")
    api.refused(
        lambda: api.decrypt(m["ciphertext"], made[-1]["key_id"], m["annotations"]), g.INVALID_ARGUMENT, "other key_id"
    )
    other = dict(m["annotations"])
    other["version.kmsd.io"] = made[-1]["annotations"]["version.kmsd.io"]
    api.refused(lambda: api.decrypt(m["ciphertext"], m["key_id"], other), g.INVALID_ARGUMENT, "other version annotation")
    api.refused(lambda: api.decrypt(m["ciphertext"][:20], m["key_id"], {}), g.INVALID_ARGUMENT, "truncated")
    api.refused(lambda: api.decrypt(os.urandom(80), "", {}), g.INVALID_ARGUMENT, "random bytes")
    api.refused(lambda: api.decrypt(b"", "", {}), g.INVALID_ARGUMENT, "empty ciphertext")
    # The version in the header is covered by the tag: naming another
    # version (with matching key_id) does not open either.
    renamed = bytearray(made[-1]["ciphertext"])
    renamed[17:21] = bytearray(m["ciphertext"][17:21])
    api.refused(lambda: api.decrypt(bytes(renamed), m["key_id"], {}), g.INVALID_ARGUMENT, "header from another version")
    print("altered ciphertexts, key_ids and annotations refused")

    # Size limits: what kube-apiserver sends fits, more is refused clearly.
    r = api.encrypt(os.urandom(MAX_PLAINTEXT))
    check(len(r.ciphertext) <= MAX_CIPHERTEXT, f"largest plaintext gave {len(r.ciphertext)} bytes")
    details = api.refused(lambda: api.encrypt(os.urandom(MAX_PLAINTEXT + 1)), g.INVALID_ARGUMENT, "oversized plaintext")
    check("plaintext" in details, f"oversized plaintext refused as {details!r}")
    api.refused(lambda: api.encrypt(b""), g.INVALID_ARGUMENT, "empty plaintext")
    api.refused(lambda: api.decrypt(os.urandom(MAX_CIPHERTEXT + 1), "", {}), g.INVALID_ARGUMENT, "oversized ciphertext")
    big = {"note.example.com": os.urandom(MAX_ANNOTATIONS)}
    api.refused(lambda: api.decrypt(m["ciphertext"], m["key_id"], big), g.INVALID_ARGUMENT, "oversized annotations")
    api.refused(lambda: api.encrypt(os.urandom(1 << 20)), g.OUT_OF_RANGE, "1 MiB message")
    api.reopen(made[:1])
    print("size limits hold")

    # A disabled key: Status says why, calls fail; enabled again, all is back.
    api.kmsctl("key", "disable", args.key)
    s = api.status()
    check(s.version == "v2", f"Status version {s.version!r}")
    check(s.healthz != "ok" and "disabled" in s.healthz, f"Status of a disabled key: healthz {s.healthz!r}")
    api.refused(lambda: api.encrypt(os.urandom(32)), g.FAILED_PRECONDITION, "Encrypt with a disabled key")
    api.refused(lambda: api.reopen(made[:1]), g.FAILED_PRECONDITION, "Decrypt with a disabled key")
    print(f"disabled: healthz {s.healthz!r}")
    api.kmsctl("key", "enable", args.key)
    check(api.healthy() == key_ids[-1], "enabling changed the key_id")
    api.reopen(made)
    print("enabled again: healthy, same key_id, everything opens")

    # Many calls at once on one connection, as a busy apiserver makes.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        batches = list(pool.map(lambda _: api.seal(key_ids[-1], 4), range(16)))
    for b in batches:
        api.reopen(b)
    print("16 concurrent callers sealed and opened 64 seeds")

    if args.save:
        with open(args.save, "w") as f:
            json.dump({"key_ids": key_ids, "made": [encode(x) for x in made]}, f)


def encode(m):
    return {
        "seed": b64(m["seed"]),
        "ciphertext": b64(m["ciphertext"]),
        "key_id": m["key_id"],
        "annotations": {k: b64(v) for k, v in m["annotations"].items()},
    }


def decode(m):
    return {
        "seed": unb64(m["seed"]),
        "ciphertext": unb64(m["ciphertext"]),
        "key_id": m["key_id"],
        "annotations": {k: unb64(v) for k, v in m["annotations"].items()},
    }


def b64(b):
    return base64.b64encode(b).decode()


def unb64(s):
    return base64.b64decode(s)


def load(path):
    with open(path) as f:
        saved = json.load(f)
    return saved["key_ids"], [decode(m) for m in saved["made"]]


def reopen(api, args):
    key_ids, made = load(args.load)
    check(api.healthy() == key_ids[-1], "key_id changed across the restart")
    api.reopen(made)
    print(f"after the restart: {len(made)} ciphertexts open, key_id {key_ids[-1]}")


def denied(api, args):
    g = api.grpc.StatusCode
    _, made = load(args.load)
    s = api.status()
    check(s.healthz != "ok" and "permission-denied" in s.healthz, f"Status for a stranger: {s.healthz!r}")
    check(s.key_id == "", f"Status for a stranger names a key_id {s.key_id!r}")
    api.refused(lambda: api.encrypt(os.urandom(32)), g.PERMISSION_DENIED, "Encrypt by a stranger")
    m = made[0]
    api.refused(
        lambda: api.decrypt(m["ciphertext"], m["key_id"], m["annotations"]), g.PERMISSION_DENIED, "Decrypt by a stranger"
    )
    print(f"uid {os.getuid()} refused: {s.healthz!r}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--socket", required=True, help="the plugin socket ([kubernetes] socket)")
    p.add_argument("--proto", required=True, help="daemon/proto/kms_v2.proto")
    p.add_argument("--kmsctl", default="kmsctl")
    p.add_argument("--kmsd-socket", help="kmsd's own socket, for kmsctl")
    p.add_argument("--key", help="the plugin's key, for kmsctl")
    p.add_argument("--save", help="scenario: write what was sealed here")
    p.add_argument("--load", help="reopen, denied: what scenario saved")
    p.add_argument("command", choices=["scenario", "reopen", "denied"])
    args = p.parse_args()
    api = Apiserver(args)
    {"scenario": scenario, "reopen": reopen, "denied": denied}[args.command](api, args)


if __name__ == "__main__":
    main()
