//! Criterion benchmarks of anomos-proto's cryptographic hot paths:
//!
//! * `tc_peel/{2048,3072}`: one hop peeling its tracking-code layer (RSA-OAEP decrypt + AES-GCM over ~4 KiB);
//! * `tc_build/4hop_*`: the tracker building a TC for 3 relays + target;
//! * `link_cell/*`: sealing and opening one link cell (SEALED_CELL_LEN bytes on the wire), in place and through
//!   `seal_cell`/`open_cell`, next to raw AES-256-GCM sealing and opening the same number of bytes with a
//!   counter nonce: `aws-lc-rs` used directly (what `AeadCounter` runs on; the difference is the link layer's own
//!   overhead), and the RustCrypto `aes_gcm` crate used before it (and `ring`), for comparison;
//! * `onion/hop_layer_forward`: one relay stripping its AES-256-CTR layer from a DATA payload;
//! * `relay_cell/*`: a relay's whole per-cell user-space work on one DATA cell, without sockets: open the sealed
//!   cell from the in-link, decode it (`Cell::decode`: a new boxed payload), strip the hop layer, encode it into
//!   the out-link's batch buffer and seal it (`alloc`); and the same decoding into a reused box
//!   (`Cell::decode_reusing`, what the node's link reader does with its payload pool: `reuse`). In this tight
//!   loop malloc hands back the same chunk every time, so the difference is only the zeroing and bookkeeping;
//!   in a relay without the pool the payload is freed on another task after the write, and glibc's heap
//!   trimming then makes the allocation cost page faults (docs/PERFORMANCE.md);
//! * `rsa_oaep_decrypt/{2048,3072}`: the RSA private-key operation alone;
//! * `rsa_pss_sign/{aws_lc,rsa_crate}_{2048,3072}`: one RSA-PSS(SHA-256) signature (probe answer, link AUTH,
//!   tracker Hello) by AWS-LC, what peers and trackers run, and by the `rsa` crate's seeded signer, which only the
//!   test vectors use and which signed everything before (SPEC §11.8).
//!
//! The summary also times the acceptor refusing a link AUTH for a fingerprint that is not its neighbor and for a
//! neighbor's with a bad signature (`auth_refused_*_us`): the two should take about as long (SPEC open issue 10).
//!
//! After criterion's report it prints one `SUMMARY ...` line computed from its own `Instant`-timed loops (not
//! from criterion's statistics); MB/s there is 10^6 bytes per second. The identities are the committed vector
//! keys, so no key generation is timed or needed.
// Benchmark code: a failed assumption should fail loudly, so unwrap/expect/panic/indexing are fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use anomos_proto::cell::{Cell, Command, CELL_LEN, CELL_PAYLOAD_LEN, SEALED_CELL_LEN};
use anomos_proto::circuit::HopLayer;
use anomos_proto::crypto::{counter_nonce, Secret};
use anomos_proto::identity::Identity;
use anomos_proto::ids::{ChainId, NeighborId};
use anomos_proto::link::{Acceptor, Dialer, LinkCipher};
use anomos_proto::tc::{self, HopSpec, Layer, LayerKind, TC_LEN};
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

struct Ids {
    k2048: [Identity; 3],
    k3072: Identity,
}

fn ids() -> Ids {
    let load = |pem: &str| Identity::from_pkcs8_pem(pem).expect("committed vector key");
    Ids {
        k2048: [
            load(include_str!("../tests/vectors/keys/id0_2048.pem")),
            load(include_str!("../tests/vectors/keys/id1_2048.pem")),
            load(include_str!("../tests/vectors/keys/id2_2048.pem")),
        ],
        k3072: load(include_str!("../tests/vectors/keys/id3_3072.pem")),
    }
}

fn rng(seed: u64) -> ChaCha20Rng {
    ChaCha20Rng::seed_from_u64(seed)
}

/// Hop specs for `keys` (relays, then the target).
fn path(keys: &[&Identity]) -> Vec<HopSpec> {
    let n = keys.len();
    keys.iter()
        .enumerate()
        .map(|(i, id)| HopSpec {
            key: id.public().clone(),
            layer: Layer {
                prev: NeighborId(10 + i as u64),
                kind: if i + 1 == n {
                    LayerKind::Target {
                        chain: ChainId::new("regtest").expect("chain"),
                        session: [1; 16],
                        e2e_secret: Secret([2; 32]),
                    }
                } else {
                    LayerKind::Relay { next: NeighborId(11 + i as u64) }
                },
                hop_secret: Secret([i as u8; 32]),
                expires: u64::MAX,
                replay_tag: [i as u8; 16],
            },
        })
        .collect()
}

fn link_pair(ids: &Ids) -> (LinkCipher, LinkCipher) {
    let (d, a) = (&ids.k2048[0], &ids.k2048[1]);
    let nid = NeighborId(7);
    let (dialer, hello) = Dialer::start(&mut rng(1), a.public().clone(), nid);
    let (acceptor, reply) = Acceptor::start(&mut rng(2), &hello).expect("start");
    let (dialer, auth) = dialer.on_reply(&reply, d, &mut rng(3)).expect("reply");
    let out = acceptor.on_auth(&auth, a, &mut rng(4), |_| Some((d.public().clone(), nid)), |_| false).expect("auth");
    let acc = out.result.expect("accepted");
    (dialer.on_auth_reply(&out.reply).expect("auth reply"), acc)
}

/// Seal then open one cell in place on a link (dialer -> acceptor); the buffer ends as it started.
fn cell_round(d: &mut LinkCipher, a: &mut LinkCipher, buf: &mut [u8; SEALED_CELL_LEN]) {
    d.seal_in_place(buf).expect("seal");
    a.open_in_place(buf).expect("open");
}

/// The same work with `aws-lc-rs` directly (the implementation behind `AeadCounter`): CELL_LEN bytes sealed and
/// opened under a counter nonce.
struct RawGcm {
    cipher: aws_lc_rs::aead::LessSafeKey,
    n: u64,
}

impl RawGcm {
    fn new() -> Self {
        let key = aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_256_GCM, &[9u8; 32]).expect("key");
        RawGcm { cipher: aws_lc_rs::aead::LessSafeKey::new(key), n: 0 }
    }
    fn round(&mut self, buf: &mut [u8; SEALED_CELL_LEN]) {
        use aws_lc_rs::aead::{Aad, Nonce};
        let nonce = counter_nonce(self.n);
        self.n += 1;
        let (body, tag_out) = buf.split_at_mut(CELL_LEN);
        let tag = self
            .cipher
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), body)
            .expect("seal");
        tag_out.copy_from_slice(tag.as_ref());
        self.cipher
            .open_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), tag.as_ref(), body)
            .expect("open");
    }
}

/// The same with the RustCrypto `aes_gcm` crate, which `AeadCounter` used before (for comparison).
struct RustCryptoGcm {
    cipher: Aes256Gcm,
    n: u64,
}

impl RustCryptoGcm {
    fn new() -> Self {
        RustCryptoGcm { cipher: Aes256Gcm::new((&[9u8; 32]).into()), n: 0 }
    }
    fn round(&mut self, buf: &mut [u8; SEALED_CELL_LEN]) {
        let nonce = counter_nonce(self.n);
        self.n += 1;
        let (body, tag_out) = buf.split_at_mut(CELL_LEN);
        let tag = self.cipher.encrypt_in_place_detached(Nonce::from_slice(&nonce), b"", body).expect("seal");
        tag_out.copy_from_slice(&tag);
        self.cipher.decrypt_in_place_detached(Nonce::from_slice(&nonce), b"", body, &tag).expect("open");
    }
}

/// A relay between two links: cells arrive sealed from the in-link (opened with `open`), get the hop layer,
/// and leave sealed for the out-link (`seal`). Only the relay's own work is timed; the sender that seals the
/// inbound cells (`Inbound`) runs in criterion's untimed setup.
struct RelayPath {
    open: LinkCipher,
    seal: LinkCipher,
    hop: HopLayer,
    out: Box<[u8; SEALED_CELL_LEN]>,
    reused: Option<Box<[u8; CELL_PAYLOAD_LEN]>>,
}

/// The in-link's sender.
struct Inbound(LinkCipher);

impl Inbound {
    fn next(&mut self) -> Box<[u8; SEALED_CELL_LEN]> {
        let mut w = Box::new([0u8; SEALED_CELL_LEN]);
        sample_cell().encode_into((&mut w[..CELL_LEN]).try_into().expect("len"));
        self.0.seal_in_place(&mut w).expect("seal");
        w
    }
}

impl RelayPath {
    fn new(ids: &Ids) -> (Inbound, Self) {
        let (send, open) = link_pair(ids);
        let (seal, _far_end) = link_pair(ids);
        let relay = RelayPath {
            open,
            seal,
            hop: HopLayer::new(&Secret([5; 32])),
            out: Box::new([0u8; SEALED_CELL_LEN]),
            reused: Some(Box::new([0u8; CELL_PAYLOAD_LEN])),
        };
        (Inbound(send), relay)
    }

    /// One cell through the relay: open, decode (a fresh payload box, or the payload copied into a reused one),
    /// hop layer, encode into the out-link buffer, seal.
    fn cell(&mut self, wire: &mut [u8; SEALED_CELL_LEN], reuse: bool) {
        self.open.open_in_place(wire).expect("open");
        let mut cell = match (reuse, self.reused.take()) {
            (true, Some(payload)) => Cell::decode_reusing(&wire[..CELL_LEN], payload).expect("decode"),
            (_, kept) => {
                self.reused = kept;
                Cell::decode(&wire[..CELL_LEN]).expect("decode")
            }
        };
        self.hop.forward(&mut cell.payload[..]);
        cell.encode_into((&mut self.out[..CELL_LEN]).try_into().expect("len"));
        self.seal.seal_in_place(&mut self.out).expect("seal");
        if reuse {
            self.reused = Some(cell.payload);
        }
        black_box(&self.out);
    }
}

fn sample_cell() -> Cell {
    let mut c = Cell::new(0x8000_0001, Command::Data);
    for (i, b) in c.payload.iter_mut().enumerate() {
        *b = i as u8;
    }
    c
}

fn benches(c: &mut Criterion, ids: &Ids) {
    let mut r = rng(100);

    let mut g = c.benchmark_group("tc_peel");
    for (bits, first) in [(2048, &ids.k2048[0]), (3072, &ids.k3072)] {
        let tc = tc::build(&path(&[first, &ids.k2048[1], &ids.k2048[2], &ids.k2048[0]]), &mut rng(5)).expect("tc");
        g.bench_with_input(BenchmarkId::from_parameter(bits), &tc, |b, tc| {
            b.iter(|| tc::peel(black_box(tc), first).expect("peel"))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("tc_build");
    let p2048 = path(&[&ids.k2048[0], &ids.k2048[1], &ids.k2048[2], &ids.k2048[0]]);
    g.bench_function("4hop_2048", |b| b.iter(|| tc::build(black_box(&p2048), &mut r).expect("build")));
    let mixed = path(&[&ids.k2048[0], &ids.k3072, &ids.k2048[1], &ids.k2048[2]]);
    g.bench_function("4hop_mixed_3072", |b| b.iter(|| tc::build(black_box(&mixed), &mut r).expect("build")));
    g.finish();

    let mut g = c.benchmark_group("link_cell");
    g.throughput(Throughput::Bytes(SEALED_CELL_LEN as u64));
    let (mut d, mut a) = link_pair(ids);
    let mut buf = Box::new([0u8; SEALED_CELL_LEN]);
    sample_cell().encode_into((&mut buf[..CELL_LEN]).try_into().expect("len"));
    g.bench_function("seal_open_in_place", |b| b.iter(|| cell_round(&mut d, &mut a, black_box(&mut buf))));
    let cell = sample_cell();
    g.bench_function("seal_cell_open_cell", |b| {
        b.iter(|| {
            let s = d.seal_cell(black_box(&cell)).expect("seal");
            a.open_cell(&s).expect("open")
        })
    });
    let mut raw = RawGcm::new();
    g.bench_function("raw_awslc_aes256gcm_seal_open", |b| b.iter(|| raw.round(black_box(&mut buf))));
    let mut rc = RustCryptoGcm::new();
    g.bench_function("raw_rustcrypto_aes256gcm_seal_open", |b| b.iter(|| rc.round(black_box(&mut buf))));
    g.finish();

    let mut g = c.benchmark_group("onion");
    g.throughput(Throughput::Bytes(CELL_PAYLOAD_LEN as u64));
    let mut hop = HopLayer::new(&Secret([5; 32]));
    let mut payload = [0u8; CELL_PAYLOAD_LEN];
    g.bench_function("hop_layer_forward", |b| b.iter(|| hop.forward(black_box(&mut payload))));
    g.finish();

    let mut g = c.benchmark_group("relay_cell");
    g.throughput(Throughput::Bytes(SEALED_CELL_LEN as u64));
    for (name, reuse) in [("alloc", false), ("reuse", true)] {
        let (mut inbound, mut relay) = RelayPath::new(ids);
        g.bench_function(name, |b| {
            b.iter_batched_ref(|| inbound.next(), |w| relay.cell(w, reuse), BatchSize::SmallInput)
        });
    }
    g.finish();

    let mut g = c.benchmark_group("rsa_oaep_decrypt");
    for (bits, id) in [(2048, &ids.k2048[0]), (3072, &ids.k3072)] {
        let ct = id.public().encrypt(&[7; 32]).expect("encrypt");
        g.bench_with_input(BenchmarkId::from_parameter(bits), &ct, |b, ct| {
            b.iter(|| id.decrypt(black_box(ct), "bench").expect("decrypt"))
        });
    }
    g.finish();
    let mut g = c.benchmark_group("rsa_pss_sign");
    for (bits, id) in [(2048, &ids.k2048[0]), (3072, &ids.k3072)] {
        let seeded = id.clone().with_seeded_signer();
        let mut r = rng(11);
        g.bench_function(format!("aws_lc_{bits}"), |b| b.iter(|| id.sign(&mut r, black_box(&[7; 64]))));
        g.bench_function(format!("rsa_crate_{bits}"), |b| b.iter(|| seeded.sign(&mut r, black_box(&[7; 64]))));
    }
    g.finish();
}

/// Mean seconds per call of `f`, timed over at least `budget` after a short warm-up.
fn time(budget: Duration, mut f: impl FnMut()) -> f64 {
    let warm = Instant::now();
    while warm.elapsed() < budget / 10 {
        f();
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < budget {
        for _ in 0..8 {
            f();
        }
        n += 8;
    }
    start.elapsed().as_secs_f64() / n as f64
}

/// Mean time of `Acceptor::on_auth` refusing an AUTH whose fingerprint `lookup` answers with `key` (`None`: not a
/// neighbor) and whose signature does not verify against it; only `on_auth` is timed.
fn auth_refusal(ids: &Ids, key: Option<&anomos_proto::identity::PublicKey>, n: u64) -> f64 {
    let (d, a) = (&ids.k2048[0], &ids.k2048[1]);
    let prepared: Vec<_> = (0..n)
        .map(|i| {
            let (dialer, hello) = Dialer::start(&mut rng(10_000 + i), a.public().clone(), NeighborId(7));
            let (acceptor, reply) = Acceptor::start(&mut rng(20_000 + i), &hello).expect("start");
            let (_, auth) = dialer.on_reply(&reply, d, &mut rng(30_000 + i)).expect("reply");
            (acceptor, auth)
        })
        .collect();
    let start = Instant::now();
    for (acceptor, auth) in prepared {
        let out = acceptor.on_auth(&auth, a, &mut rng(4), |_| key.map(|k| (k.clone(), NeighborId(7))), |_| false);
        assert!(black_box(out).expect("auth").result.is_err(), "refused");
    }
    start.elapsed().as_secs_f64() / n as f64
}

fn summary(ids: &Ids, budget: Duration) {
    let mut r = rng(200);
    let mbps = |secs: f64, bytes: usize| bytes as f64 / secs / 1e6;
    let tc2048 = tc::build(&path(&[&ids.k2048[0], &ids.k2048[1], &ids.k2048[2]]), &mut rng(7)).expect("tc");
    let tc3072 = tc::build(&path(&[&ids.k3072, &ids.k2048[1], &ids.k2048[2]]), &mut rng(8)).expect("tc");
    let peel2048 = time(budget, || {
        black_box(tc::peel(&tc2048, &ids.k2048[0]).expect("peel"));
    });
    let peel3072 = time(budget, || {
        black_box(tc::peel(&tc3072, &ids.k3072).expect("peel"));
    });
    let p4 = path(&[&ids.k2048[0], &ids.k2048[1], &ids.k2048[2], &ids.k2048[0]]);
    let build = time(budget, || {
        black_box(tc::build(&p4, &mut r).expect("build"));
    });
    let ct = ids.k2048[0].public().encrypt(&[7; 32]).expect("encrypt");
    let oaep = time(budget, || {
        black_box(ids.k2048[0].decrypt(&ct, "bench").expect("decrypt"));
    });
    let sign_aws_lc = time(budget, || {
        black_box(ids.k2048[0].sign(&mut r, &[7; 64]));
    });
    let seeded = ids.k2048[0].clone().with_seeded_signer();
    let sign_rsa_crate = time(budget, || {
        black_box(seeded.sign(&mut r, &[7; 64]));
    });
    let (mut d, mut a) = link_pair(ids);
    let mut buf = Box::new([0u8; SEALED_CELL_LEN]);
    sample_cell().encode_into((&mut buf[..CELL_LEN]).try_into().expect("len"));
    let cell = time(budget, || cell_round(&mut d, &mut a, black_box(&mut buf)));
    let mut raw = RawGcm::new();
    let gcm = time(budget, || raw.round(black_box(&mut buf)));
    let mut rc = RustCryptoGcm::new();
    let rc_gcm = time(budget, || rc.round(black_box(&mut buf)));
    let mut hop = HopLayer::new(&Secret([5; 32]));
    let mut payload = [0u8; CELL_PAYLOAD_LEN];
    let fwd = time(budget, || hop.forward(black_box(&mut payload)));
    let (cell_mbps, gcm_mbps) = (mbps(cell, SEALED_CELL_LEN), mbps(gcm, SEALED_CELL_LEN));
    let relay_cell = |reuse: bool| {
        let (mut inbound, mut relay) = RelayPath::new(ids);
        let mut spent = Duration::ZERO;
        let mut n = 0u64;
        let start = Instant::now();
        while start.elapsed() < budget {
            let mut batch: Vec<_> = (0..64).map(|_| inbound.next()).collect();
            let t = Instant::now();
            for w in batch.iter_mut() {
                relay.cell(w, reuse);
            }
            spent += t.elapsed();
            n += 64;
        }
        spent.as_secs_f64() / n as f64
    };
    let (relay_alloc, relay_reuse) = (relay_cell(false), relay_cell(true));
    // A stranger's fingerprint against a neighbor's whose signature does not verify (here: signed by another key).
    let auths = if budget < Duration::from_millis(100) { 4 } else { 200 };
    let (stranger, bad_sig) = (auth_refusal(ids, None, auths), auth_refusal(ids, Some(ids.k2048[2].public()), auths));
    println!(
        "SUMMARY tc_peel_2048_ms={:.3} tc_peel_3072_ms={:.3} tc_build_4hop_ms={:.3} rsa_oaep_decrypt_2048_ms={:.3} \
         cell_seal_open_MBps={:.1} raw_gcm_seal_open_MBps={:.1} ratio={:.3} rustcrypto_gcm_seal_open_MBps={:.1} \
         hop_forward_MBps={:.1} tc_len={} relay_cell_us={:.3} relay_cell_reuse_us={:.3} relay_cell_ms_per_MB={:.3} \
         relay_cell_reuse_ms_per_MB={:.3} auth_refused_stranger_us={:.1} auth_refused_bad_signature_us={:.1} \
         rsa_pss_sign_2048_ms={:.3} rsa_pss_sign_2048_rsa_crate_ms={:.3}",
        peel2048 * 1e3,
        peel3072 * 1e3,
        build * 1e3,
        oaep * 1e3,
        cell_mbps,
        gcm_mbps,
        cell_mbps / gcm_mbps,
        mbps(rc_gcm, SEALED_CELL_LEN),
        mbps(fwd, CELL_PAYLOAD_LEN),
        TC_LEN,
        relay_alloc * 1e6,
        relay_reuse * 1e6,
        // Per MB (10^6 bytes) of record data: a cell carries RECORD_DATA_MAX = 4093 bytes.
        relay_alloc * 1e3 * 1e6 / 4093.0,
        relay_reuse * 1e3 * 1e6 / 4093.0,
        stranger * 1e6,
        bad_sig * 1e6,
        sign_aws_lc * 1e3,
        sign_rsa_crate * 1e3,
    );
}

fn main() {
    let ids = ids();
    let mut c = Criterion::default().configure_from_args();
    benches(&mut c, &ids);
    c.final_summary();
    // Without `--bench` (e.g. `cargo test --benches`) criterion runs each benchmark once as a test: keep the
    // summary loops short then too.
    let quick = !std::env::args().any(|a| a == "--bench");
    summary(&ids, if quick { Duration::from_millis(20) } else { Duration::from_secs(2) });
}
