#!/usr/bin/env python3
"""A Bitcoin P2P client we did not write (python-bitcoinlib) talking to an anomos client bridge.

Connects to 127.0.0.1:PORT (regtest, magic fabfb5da), does version/verack, getheaders from the regtest
genesis, checks the headers chain (linkage, count, tip), fetches the tip block and the first block with
getdata and checks each block's hash and merkle root (and python-bitcoinlib's own CheckBlock). Prints
one result line, `bridge_client ok ...` or `bridge_client FAIL: ...`, and exits 0 or 1.

Needs: pip install python-bitcoinlib==0.12.2 (module `bitcoin`). Messages are built and payloads parsed
with python-bitcoinlib; the framing is read here, because python-bitcoinlib 0.12.2's msg_headers parser
does not consume the tx-count byte after each header (it decodes only a single-header `headers`
correctly), so `headers` payloads are parsed here with its CBlockHeader.
"""

import argparse
import hashlib
import socket
import struct
import sys
import time
from io import BytesIO

try:
    import bitcoin
    from bitcoin.core import CBlock, CBlockHeader, CheckBlock, b2lx, lx
    from bitcoin.core.serialize import VarIntSerializer
    from bitcoin.messages import messagemap, msg_getdata, msg_getheaders, msg_verack, msg_version
    from bitcoin.net import CInv
except ImportError as e:  # pragma: no cover
    print(f"bridge_client SKIP: python-bitcoinlib not installed ({e})")
    sys.exit(2)

MSG_BLOCK = 2
PROTOCOL_VERSION = 70016  # the serving peer wants at least 70001 (version with the relay byte)


class Peer:
    def __init__(self, host, port, timeout):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""

    def send(self, msg):
        self.sock.sendall(msg.to_bytes())

    def _read(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the bridge closed the connection")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv(self):
        """One envelope: (command, payload), with magic and checksum checked."""
        header = self._read(24)
        if header[:4] != bitcoin.params.MESSAGE_START:
            raise ValueError(f"bad magic {header[:4].hex()}")
        command = header[4:16].rstrip(b"\x00").decode("ascii")
        (length,) = struct.unpack("<I", header[16:20])
        if length > 4_000_000:
            raise ValueError(f"oversized {command} ({length} bytes)")
        payload = self._read(length)
        if hashlib.sha256(hashlib.sha256(payload).digest()).digest()[:4] != header[20:24]:
            raise ValueError(f"bad checksum on {command}")
        return command, payload

    def expect(self, command):
        while True:
            cmd, payload = self.recv()
            if cmd == command:
                return payload


def parse_headers(payload):
    f = BytesIO(payload)
    n = VarIntSerializer.stream_deserialize(f)
    headers = []
    for _ in range(n):
        headers.append(CBlockHeader.stream_deserialize(f))
        if VarIntSerializer.stream_deserialize(f) != 0:
            raise ValueError("headers entry with a non-zero tx count")
    if f.read():
        raise ValueError("trailing bytes after headers")
    return headers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--height", type=int, required=True, help="expected number of headers after genesis")
    ap.add_argument("--tip", required=True, help="expected tip hash (hex, as displayed)")
    ap.add_argument("--timeout", type=float, default=30.0)
    args = ap.parse_args()

    bitcoin.SelectParams("regtest")
    assert bitcoin.params.MESSAGE_START == bytes.fromhex("fabfb5da")
    genesis = bitcoin.params.GENESIS_BLOCK.GetHash()
    t0 = time.monotonic()
    peer = Peer(args.host, args.port, args.timeout)

    # Handshake: our version; their version and verack (either order); our verack.
    v = msg_version(protover=PROTOCOL_VERSION)
    v.nStartingHeight = 0
    peer.send(v)
    got_version = got_verack = False
    their_version = None
    while not (got_version and got_verack):
        cmd, payload = peer.recv()
        if cmd == "version":
            their_version = messagemap[b"version"].msg_deser(BytesIO(payload))
            got_version = True
        elif cmd == "verack":
            got_verack = True
    peer.send(msg_verack(protover=PROTOCOL_VERSION))

    # Headers from genesis.
    gh = msg_getheaders(protover=PROTOCOL_VERSION)
    gh.locator.nVersion = PROTOCOL_VERSION
    gh.locator.vHave = [genesis]
    peer.send(gh)
    headers = parse_headers(peer.expect("headers"))
    if len(headers) != args.height:
        raise AssertionError(f"{len(headers)} headers, expected {args.height}")
    prev = genesis
    for i, h in enumerate(headers):
        if h.hashPrevBlock != prev:
            raise AssertionError(f"header {i + 1} does not link to its predecessor")
        prev = h.GetHash()
    if b2lx(prev) != args.tip:
        raise AssertionError(f"tip {b2lx(prev)}, expected {args.tip}")

    # The tip block and the first block.
    want = [headers[-1], headers[0]]
    gd = msg_getdata(protover=PROTOCOL_VERSION)
    for h in want:
        inv = CInv()
        inv.type = MSG_BLOCK
        inv.hash = h.GetHash()
        gd.inv.append(inv)
    peer.send(gd)
    txs = 0
    for h in want:
        block = CBlock.stream_deserialize(BytesIO(peer.expect("block")))
        if block.GetHash() != h.GetHash():
            raise AssertionError(f"got block {b2lx(block.GetHash())}, asked for {b2lx(h.GetHash())}")
        if block.calc_merkle_root() != block.hashMerkleRoot:
            raise AssertionError(f"block {b2lx(block.GetHash())}: merkle root does not match")
        CheckBlock(block, cur_time=int(time.time()) + 7200)
        txs += len(block.vtx)
    if lx(args.tip) != headers[-1].GetHash():
        raise AssertionError("tip mismatch")
    peer.sock.close()
    print(
        f"bridge_client ok height={len(headers)} tip={b2lx(prev)} blocks=2 txs={txs} "
        f"peer_agent={their_version.strSubVer.decode(errors='replace')} time={time.monotonic() - t0:.2f}s"
    )


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # one result line, whatever went wrong
        print(f"bridge_client FAIL: {type(e).__name__}: {e}")
        sys.exit(1)
