//! Generates the known-answer vectors committed under `proto/tests/vectors/{keys,tc,link,cells,tracker}/`.
//!
//! ```text
//! cargo run -p anomos-proto --example gen_vectors -- proto/tests/vectors [--regen-keys] [--fuzz-corpus proto/fuzz/corpus]
//! ```
//!
//! Every random choice comes from `rand_chacha::ChaCha20Rng::seed_from_u64(SEED)` with the seeds below, so the
//! output is a pure function of the code and the identity keys. The identity keys are *loaded* from
//! `<outdir>/keys/*.pem` when they exist (RSA key generation from a seeded rng is only reproducible for one
//! version of the `rsa` crate); pass `--regen-keys` to generate them afresh from their seeds.
//!
//! Every intermediate value written (seeds, layer headers, handshake transcript hashes, derived keys) is
//! cross-checked here against the crate's own behaviour before it is written, so a file never documents a
//! derivation the implementation does not perform. `proto/tests/vectors.rs` checks the committed files.
//!
//! With `--fuzz-corpus DIR` it also writes seed inputs for the cargo-fuzz targets in `proto/fuzz/` (their input
//! formats are described at the top of each `proto/fuzz/fuzz_targets/*.rs`).
// A developer tool: a failed assumption should fail loudly, so unwrap/expect/panic/indexing are fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anomos_proto::cell::{BreakReason, Cell, Command, DenyReason, CELL_LEN, CELL_PAYLOAD_LEN, SEALED_CELL_LEN};
use anomos_proto::crypto::{kdf, kdf_stream, sha256, AeadCounter, Secret, TAG_LEN};
use anomos_proto::identity::Identity;
use anomos_proto::ids::{ChainId, NeighborId};
use anomos_proto::link::{self, Acceptor, Dialer, HELLO_LEN};
use anomos_proto::tc::{self, HopSpec, Layer, LayerKind, LAYER_HEADER_LEN, TC_LEN};
use anomos_proto::tracker::{
    self, Announce, AnnounceReply, FromTracker, NeighborInfo, ToTracker, TrackerChannel, CLIENT_HELLO_HEADER,
    EPHEMERAL_LEN,
};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// The identities: file stem, rng seed, modulus bits.
const KEYS: [(&str, u64, usize); 4] =
    [("id0_2048", 1001, 2048), ("id1_2048", 1002, 2048), ("id2_2048", 1003, 2048), ("id3_3072", 1004, 3072)];

const TC_FIELDS_SEED: u64 = 2000;
const TC_BUILD_SEED: u64 = 2001;
const TC_EXPIRES: u64 = 1_900_000_000;
/// TC path: relay id0 (2048), relay id3 (3072), target id1 (2048).
const TC_PATH: [usize; 3] = [0, 3, 1];

const LINK_DIALER_SEED: u64 = 3001;
const LINK_ACCEPTOR_SEED: u64 = 3002;
const LINK_D2A_DATA_SEED: u64 = 3003;
const LINK_A2D_DATA_SEED: u64 = 3004;
const LINK_PROBE_SEED: u64 = 3005;
const LINK_NID: u64 = 0x0123_4567_89ab_cdef;
/// Nonce of the probe vector (also the fixed nonce of the `tracker_msg` fuzz target).
const PROBE_NONCE: [u8; 32] = [0x42; 32];

const CELLS_DATA_SEED: u64 = 5001;

const TRACKER_PEER_SEED: u64 = 4001;
const TRACKER_SEED: u64 = 4002;
const RESUME_PEER_SEED: u64 = 4003;
const RESUME_TRACKER_SEED: u64 = 4004;

fn rng(seed: u64) -> ChaCha20Rng {
    ChaCha20Rng::seed_from_u64(seed)
}

/// A vector file being written: `name = value` lines under a `#` comment header.
struct Doc(String);

impl Doc {
    fn new(header: &str) -> Self {
        let mut s = String::new();
        for line in header.trim().lines() {
            let line = line.trim_end();
            let _ = if line.is_empty() { writeln!(s, "#") } else { writeln!(s, "# {line}") };
        }
        s.push('\n');
        Doc(s)
    }
    fn kv(&mut self, k: &str, v: impl std::fmt::Display) {
        let _ = writeln!(self.0, "{k} = {v}");
    }
    fn hex(&mut self, k: &str, b: &[u8]) {
        self.kv(k, hex::encode(b));
    }
    fn rng_seed(&mut self, k: &str, seed: u64) {
        self.kv(k, seed);
        self.hex(&format!("{k}.chacha20_key"), &rng(seed).get_seed());
    }
    fn blank(&mut self) {
        self.0.push('\n');
    }
    fn write(&self, path: &Path) {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, &self.0).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        println!("wrote {}", path.display());
    }
}

const FORMAT: &str = "
Format (anomos vector text v1): UTF-8; each line is `name = value`, a `#` comment, or blank. Names are unique
within a file. Byte strings are lowercase hex; integers are decimal unless the key says otherwise; other
values are as the key's description says. `*.rng_seed` is the u64 given to
`rand_chacha::ChaCha20Rng::seed_from_u64` (rand_chacha 0.3); `*.rng_seed.chacha20_key` is the 32-byte ChaCha20
key that call produces (stream 0, counter 0), for implementations without rand_core's PCG32 seed expansion.
Bytes that depend on how the `rsa` crate consumes the rng (OAEP seeds, PSS salts) are reproducible only by
the Rust reference implementation; everything else here is checkable from the listed inputs alone.";

fn main() {
    let mut args = std::env::args().skip(1);
    let mut out: Option<PathBuf> = None;
    let mut regen = false;
    let mut corpus: Option<PathBuf> = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--regen-keys" => regen = true,
            "--fuzz-corpus" => corpus = Some(PathBuf::from(args.next().expect("--fuzz-corpus DIR"))),
            _ if out.is_none() => out = Some(PathBuf::from(a)),
            _ => panic!("usage: gen_vectors <outdir> [--regen-keys] [--fuzz-corpus DIR]"),
        }
    }
    let out = out.expect("usage: gen_vectors <outdir> [--regen-keys] [--fuzz-corpus DIR]");
    let ids = keys(&out, regen);
    let tcv = tc_vector(&out, &ids);
    let lv = link_vector(&out, &ids, &tcv.tcs[0]);
    cells_vector(&out, &tcv.tcs[0]);
    let tv = tracker_vector(&out, &ids);
    resume_vector(&out, &ids, &tv);
    if let Some(dir) = corpus {
        fuzz_corpus(&dir, &tcv, &lv, &tv, &out);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// (a) identities

fn keys(out: &Path, regen: bool) -> Vec<Identity> {
    let mut doc = Doc::new(&format!(
        "anomos-proto known-answer vectors: identity keys.
The PKCS#8 PEM files beside this one are the private keys; this file lists their public halves.
key.N.file         PEM file name (PKCS#8, LF line endings, as `Identity::to_pkcs8_pem` writes it)
key.N.rng_seed     seed the key was generated from: `Identity::generate(&mut ChaCha20Rng::seed_from_u64(seed), bits)`
                   (reproducible only with the rsa crate version of the generating build; tests load the PEMs)
key.N.bits         modulus size in bits
key.N.spki_der     SubjectPublicKeyInfo DER of the public key (what goes on the wire)
key.N.fingerprint  SHA-256 of spki_der
{FORMAT}"
    ));
    let mut ids = Vec::new();
    for (i, (name, seed, bits)) in KEYS.iter().enumerate() {
        let path = out.join("keys").join(format!("{name}.pem"));
        let id = if path.exists() && !regen {
            let pem = std::fs::read_to_string(&path).expect("read pem");
            let id = Identity::from_pkcs8_pem(&pem).expect("parse pem");
            assert_eq!(id.to_pkcs8_pem().expect("pem"), pem, "{name}: PEM must be canonical");
            println!("loaded {}", path.display());
            id
        } else {
            let id = Identity::generate(&mut rng(*seed), *bits).expect("keygen");
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(&path, id.to_pkcs8_pem().expect("pem")).expect("write pem");
            println!("generated {}", path.display());
            id
        };
        assert_eq!(id.public().bits(), *bits);
        // Signatures in the vectors are reproducible only with the salt drawn from the seeded rngs.
        let id = id.with_seeded_signer();
        assert_eq!(id.fingerprint().0, sha256(&[id.public().der()]));
        doc.kv(&format!("key.{i}.file"), format!("{name}.pem"));
        doc.kv(&format!("key.{i}.rng_seed"), seed);
        doc.kv(&format!("key.{i}.bits"), bits);
        doc.hex(&format!("key.{i}.spki_der"), id.public().der());
        doc.hex(&format!("key.{i}.fingerprint"), &id.fingerprint().0);
        doc.blank();
        ids.push(id);
    }
    doc.write(&out.join("keys").join("keys.txt"));
    ids
}

// ---------------------------------------------------------------------------------------------------------------
// (b) tracking code

struct TcVector {
    /// tcs[0] is the full TC, tcs[i] the TC hop i receives.
    tcs: Vec<Box<[u8; TC_LEN]>>,
    /// GCM plaintext (header || inner) of each hop's body.
    bodies: Vec<Vec<u8>>,
}

fn tc_vector(out: &Path, ids: &[Identity]) -> TcVector {
    let mut f = rng(TC_FIELDS_SEED);
    let mut b32 = || {
        let mut b = [0u8; 32];
        f.fill_bytes(&mut b);
        b
    };
    let nids: Vec<NeighborId> =
        (0..TC_PATH.len() + 1).map(|i| NeighborId(0x1000_0000_0000_0000 + i as u64 * 0x1111)).collect();
    let n = TC_PATH.len();
    let mut hops = Vec::new();
    for (i, &key) in TC_PATH.iter().enumerate() {
        let hop_secret = Secret(b32());
        let tag = b32();
        let kind = if i + 1 == n {
            let sess = b32();
            LayerKind::Target {
                chain: ChainId::new("regtest").expect("chain"),
                session: sess[..16].try_into().expect("16"),
                e2e_secret: Secret(b32()),
            }
        } else {
            LayerKind::Relay { next: nids[i + 1] }
        };
        let layer = Layer {
            prev: nids[i],
            kind,
            hop_secret,
            expires: TC_EXPIRES + i as u64,
            replay_tag: tag[..16].try_into().expect("16"),
        };
        hops.push(HopSpec { key: ids[key].public().clone(), layer });
    }
    let tc0 = tc::build_reproducible(&hops, &mut rng(TC_BUILD_SEED)).expect("build");
    assert_eq!(
        tc0,
        tc::build_reproducible(&hops, &mut rng(TC_BUILD_SEED)).expect("build"),
        "build must be deterministic"
    );

    let mut doc = Doc::new(&format!(
        "anomos-proto known-answer vectors: a 3-hop tracking code (2 relays + target, 2048/3072/2048-bit keys).
Inputs (the layer fields and hop keys) and outputs of `tc::build_reproducible`, and every hop's view while peeling.
tc.build.rng_seed   rng handed to `tc::build_reproducible` (seeds, OAEP randomness and target fill, in the crate's order)
tc.hops             number of layers
hop.I.key           key file in ../keys (its public key is the hop key)
hop.I.bits          modulus bits (k = bits/8 bytes of RSA-OAEP ciphertext at the front of that hop's TC)
hop.I.kind          relay | target
hop.I.prev          NeighborID (u64, decimal) the OPEN must arrive on
hop.I.next          relay only: NeighborID of the next edge
hop.I.hop_secret    32 bytes
hop.I.expires       unix seconds
hop.I.replay_tag    16 bytes
hop.I.chain         target only: chain id text
hop.I.session       target only: 16 bytes
hop.I.e2e_secret    target only: 32 bytes
hop.I.tc            the TC_LEN = {TC_LEN} bytes hop I receives (hop.0.tc is the full TC returned by build;
                    hop.I+1.tc is what peeling hop I yields)
hop.I.seed          the 32-byte layer seed: RSA-OAEP-SHA256 decryption of hop.I.tc[..k] with the hop's key
hop.I.body_key      HKDF-SHA256(salt=\"anomos tc v1\", ikm=seed, info=\"body\"), 32 bytes
hop.I.header        the {LAYER_HEADER_LEN}-byte layer header: first bytes of
                    AES-256-GCM-open(body_key, nonce=0^12, aad=\"anomos-tc-v1\", ct=tc[k+16..], tag=tc[k..k+16])
                    layout: [0] version=1 | [1] kind (1 relay, 2 target) | [2..10] prev BE | [10..18] next BE
                    (0 for target) | [18..50] hop_secret | [50..82] e2e_secret (0 for relay) | [82..114] chain,
                    NUL-padded (0 for relay) | [114..130] session (0 for relay) | [130..138] expires BE |
                    [138..154] replay_tag | [154..160] zero
hop.I.pad           relay only: HKDF-SHA256-expand(salt=\"anomos tc v1\", ikm=seed, info=\"pad\") to k+16+{LAYER_HEADER_LEN}
                    bytes; hop.I+1.tc = plaintext[{LAYER_HEADER_LEN}..] || pad
{FORMAT}"
    ));
    doc.rng_seed("tc.build.rng_seed", TC_BUILD_SEED);
    doc.kv("tc.hops", n);
    doc.blank();
    let mut tcs = vec![tc0.clone()];
    let mut bodies = Vec::new();
    let mut cur = tc0;
    for (i, h) in hops.iter().enumerate() {
        let id = &ids[TC_PATH[i]];
        let k = id.public().size();
        let p = format!("hop.{i}");
        doc.kv(&format!("{p}.key"), format!("{}.pem", KEYS[TC_PATH[i]].0));
        doc.kv(&format!("{p}.bits"), id.public().bits());
        let l = &h.layer;
        match &l.kind {
            LayerKind::Relay { next } => {
                doc.kv(&format!("{p}.kind"), "relay");
                doc.kv(&format!("{p}.prev"), l.prev.0);
                doc.kv(&format!("{p}.next"), next.0);
            }
            LayerKind::Target { .. } => {
                doc.kv(&format!("{p}.kind"), "target");
                doc.kv(&format!("{p}.prev"), l.prev.0);
            }
        }
        doc.hex(&format!("{p}.hop_secret"), &l.hop_secret.0);
        doc.kv(&format!("{p}.expires"), l.expires);
        doc.hex(&format!("{p}.replay_tag"), &l.replay_tag);
        if let LayerKind::Target { chain, session, e2e_secret } = &l.kind {
            doc.kv(&format!("{p}.chain"), chain);
            doc.hex(&format!("{p}.session"), session);
            doc.hex(&format!("{p}.e2e_secret"), &e2e_secret.0);
        }
        doc.hex(&format!("{p}.tc"), &cur[..]);
        // Re-derive this hop's view with public primitives, and check it against `tc::peel`.
        let seed = id.decrypt(&cur[..k], "vector").expect("oaep");
        assert_eq!(seed.len(), 32);
        let body_key = kdf(b"anomos tc v1", &[&seed], b"body");
        let mut sealed = cur[k + TAG_LEN..].to_vec();
        sealed.extend_from_slice(&cur[k..k + TAG_LEN]);
        let plain = AeadCounter::new(&body_key).open(b"anomos-tc-v1", &sealed, "vector").expect("gcm");
        doc.hex(&format!("{p}.seed"), &seed);
        doc.hex(&format!("{p}.body_key"), &body_key.0);
        doc.hex(&format!("{p}.header"), &plain[..LAYER_HEADER_LEN]);
        let peeled = tc::peel(&cur, id).expect("peel");
        assert_eq!(&peeled.layer, l);
        bodies.push(plain.clone());
        match peeled.next {
            Some(next) => {
                let mut pad = vec![0u8; k + TAG_LEN + LAYER_HEADER_LEN];
                kdf_stream(b"anomos tc v1", &seed, b"pad", &mut pad).expect("pad");
                doc.hex(&format!("{p}.pad"), &pad);
                assert_eq!([&plain[LAYER_HEADER_LEN..], &pad[..]].concat(), next.to_vec());
                tcs.push(next.clone());
                cur = next;
            }
            None => assert_eq!(i + 1, n),
        }
        doc.blank();
    }
    doc.write(&out.join("tc").join("tc_3hop.txt"));
    TcVector { tcs, bodies }
}

// ---------------------------------------------------------------------------------------------------------------
// (c) link handshake

struct LinkVector {
    hello: [u8; HELLO_LEN],
    reply: [u8; HELLO_LEN],
    auth: Vec<u8>,
    auth_plain: Vec<u8>,
    auth_reply: Vec<u8>,
    auth_reply_plain: Vec<u8>,
    d2a_sealed: Vec<Box<[u8; SEALED_CELL_LEN]>>,
    plains: Vec<[u8; CELL_LEN]>,
    probe: Vec<u8>,
    probe_answer: Vec<u8>,
}

fn random_payload(seed: u64) -> Box<[u8; CELL_PAYLOAD_LEN]> {
    let mut p = Box::new([0u8; CELL_PAYLOAD_LEN]);
    rng(seed).fill_bytes(&mut p[..]);
    p
}

fn link_vector(out: &Path, ids: &[Identity], tc0: &[u8; TC_LEN]) -> LinkVector {
    let (d_id, a_id) = (&ids[0], &ids[1]);
    let nid = NeighborId(LINK_NID);
    let mut drng = rng(LINK_DIALER_SEED);
    let mut arng = rng(LINK_ACCEPTOR_SEED);
    // X25519 ephemeral secrets are the first 32 bytes each side's rng yields.
    let mut eph_d = [0u8; 32];
    drng.clone().fill_bytes(&mut eph_d);
    let mut eph_a = [0u8; 32];
    arng.clone().fill_bytes(&mut eph_a);

    let (dialer, hello) = Dialer::start(&mut drng, a_id.public().clone(), nid);
    let (acceptor, reply) = Acceptor::start(&mut arng, &hello).expect("acceptor start");
    let (dialer, auth) = dialer.on_reply(&reply, d_id, &mut drng).expect("on_reply");
    let outcome = acceptor
        .on_auth(
            &auth,
            a_id,
            &mut arng,
            |fp| (fp == &d_id.fingerprint()).then(|| (d_id.public().clone(), nid)),
            |_| false,
        )
        .expect("on_auth");
    let mut acc = outcome.result.expect("acceptor link");
    let auth_reply = outcome.reply;
    let mut dia = dialer.on_auth_reply(&auth_reply).expect("on_auth_reply");

    // Independent derivation of the key schedule.
    let sd = x25519_dalek::StaticSecret::from(eph_d);
    let sa = x25519_dalek::StaticSecret::from(eph_a);
    assert_eq!(x25519_dalek::PublicKey::from(&sd).as_bytes(), &hello[10..42]);
    assert_eq!(x25519_dalek::PublicKey::from(&sa).as_bytes(), &reply[10..42]);
    let dh = *sd
        .diffie_hellman(&x25519_dalek::PublicKey::from(<[u8; 32]>::try_from(&reply[10..42]).expect("32")))
        .as_bytes();
    let th1 = sha256(&[&hello, &reply]);
    let hs_d = kdf(&th1, &[&dh], b"anomos link hs d2a");
    let hs_a = kdf(&th1, &[&dh], b"anomos link hs a2d");
    let auth_plain = AeadCounter::new(&hs_d).open(b"", &auth[2..], "vector").expect("auth plain");
    let th2 = sha256(&[&th1, &auth]);
    let auth_reply_plain = AeadCounter::new(&hs_a).open(b"", &auth_reply[2..], "vector").expect("reply plain");
    let th3 = sha256(&[&th2, &auth_reply]);
    let nid_be = nid.0.to_be_bytes();
    let k_d2a = kdf(&th3, &[&dh, &nid_be], b"anomos link d2a");
    let k_a2d = kdf(&th3, &[&dh, &nid_be], b"anomos link a2d");
    assert_eq!(&auth_plain[..32], &d_id.fingerprint().0);
    assert_eq!(auth_reply_plain[0], 0, "status Ok");

    let mut doc = Doc::new(&format!(
        "anomos-proto known-answer vectors: a neighbor-link handshake and the first cells each way.
Dialer = ../keys/id0_2048.pem, acceptor = ../keys/id1_2048.pem; both hold the same NeighborID for the edge.
Each side uses ONE rng for its whole handshake, in protocol order (dialer: Dialer::start then on_reply;
acceptor: Acceptor::start then on_auth).
neighbor_id          the edge's NeighborID (u64, hex, 16 digits)
dialer.eph_secret    X25519 secret: the first 32 bytes of the dialer's rng (so HELLO[10..42] is its public key)
acceptor.eph_secret  likewise for the acceptor and REPLY
hello, reply         the 74-byte HELLO / REPLY: \"ANOMOSL1\" | version u16 BE | X25519 public | nonce[32]
dh                   X25519(dialer.eph_secret, REPLY public) = X25519(acceptor.eph_secret, HELLO public)
th1                  SHA-256(hello || reply)
hs_d2a, hs_a2d       HKDF-SHA256(salt=th1, ikm=dh, info=\"anomos link hs d2a\" / \"anomos link hs a2d\")
auth                 AUTH as sent: len u16 BE | AES-256-GCM(hs_d2a, nonce=0, aad=\"\", auth.plain) || tag
auth.plain           fp_dialer[32] | sig_len u16 BE | RSA-PSS-SHA256(dialer, \"anomos link auth dialer v1\" | th1 | fp_acceptor)
th2                  SHA-256(th1 || auth)
auth_reply           AUTH_REPLY as sent: len u16 BE | AES-256-GCM(hs_a2d, nonce=0, aad=\"\", auth_reply.plain) || tag
auth_reply.plain     status u8 (0 = ok) | RSA-PSS-SHA256(acceptor, \"anomos link auth acceptor v1\" | th2 | fp_dialer)
th3                  SHA-256(th2 || auth_reply)
k_d2a, k_a2d         HKDF-SHA256(salt=th3, ikm=dh || neighbor_id (u64 BE), info=\"anomos link d2a\" / \"anomos link a2d\")
d2a.N.plain          N-th plaintext cell dialer -> acceptor ({CELL_LEN} bytes: circ_id u32 BE | command u8 | payload)
d2a.N.sealed         the same cell on the wire: AES-256-GCM(k_d2a, nonce = 0^4 || N u64 BE, aad=\"\") || tag
a2d.N.plain/sealed   likewise acceptor -> dialer under k_a2d
                     N=0 PADDING (key confirmation) whose payload starts with the sender's receive window, u16 BE:
                     128 for d2a, 64 for a2d; N=1 OPEN carrying ../tc/tc_3hop.txt hop.0.tc (dialer on
                     circuit 0x80000001, acceptor on 0x00000001); N=2 DATA with a payload from data.*.rng_seed
probe.nonce          a tracker reachability probe's nonce
probe.request        \"ANOMOSP1\" | version u16 BE | nonce
probe.answer         id0's answer: der_len u16 | SPKI DER | sig_len u16 | RSA-PSS(\"anomos probe v1\" | nonce | DER)
{FORMAT}"
    ));
    doc.kv("dialer.key", "id0_2048.pem");
    doc.kv("acceptor.key", "id1_2048.pem");
    doc.kv("neighbor_id", format!("{:016x}", nid.0));
    doc.rng_seed("dialer.rng_seed", LINK_DIALER_SEED);
    doc.rng_seed("acceptor.rng_seed", LINK_ACCEPTOR_SEED);
    doc.hex("dialer.eph_secret", &eph_d);
    doc.hex("acceptor.eph_secret", &eph_a);
    doc.blank();
    doc.hex("hello", &hello);
    doc.hex("reply", &reply);
    doc.hex("dh", &dh);
    doc.hex("th1", &th1);
    doc.hex("hs_d2a", &hs_d.0);
    doc.hex("hs_a2d", &hs_a.0);
    doc.hex("auth", &auth);
    doc.hex("auth.plain", &auth_plain);
    doc.hex("th2", &th2);
    doc.hex("auth_reply", &auth_reply);
    doc.hex("auth_reply.plain", &auth_reply_plain);
    doc.hex("th3", &th3);
    doc.hex("k_d2a", &k_d2a.0);
    doc.hex("k_a2d", &k_a2d.0);
    doc.blank();

    let mut plains = Vec::new();
    let mut d2a_sealed = Vec::new();
    for (dir, circ, data_seed, key) in
        [("d2a", 0x8000_0001u32, LINK_D2A_DATA_SEED, &k_d2a), ("a2d", 0x0000_0001u32, LINK_A2D_DATA_SEED, &k_a2d)]
    {
        doc.rng_seed(&format!("data.{dir}.rng_seed"), data_seed);
        let mut data = Cell::new(circ, Command::Data);
        data.payload = random_payload(data_seed);
        // The first cell each way announces the sender's receive window (SPEC §5.6): 128 dialer, 64 acceptor.
        let window = if dir == "d2a" { 128 } else { 64 };
        let cells = [Cell::link_params(window), Cell::open(circ, tc0), data];
        let mut check = AeadCounter::new(key);
        for (n, c) in cells.iter().enumerate() {
            let (tx, rx) = if dir == "d2a" { (&mut dia, &mut acc) } else { (&mut acc, &mut dia) };
            let sealed = tx.seal_cell(c).expect("seal");
            assert_eq!(&rx.open_cell(&sealed).expect("open"), c);
            let mut plain = [0u8; CELL_LEN];
            c.encode_into(&mut plain);
            assert_eq!(check.seal(b"", &plain).expect("seal"), sealed.to_vec(), "derived {dir} key");
            doc.hex(&format!("{dir}.{n}.plain"), &plain);
            doc.hex(&format!("{dir}.{n}.sealed"), &sealed[..]);
            if dir == "d2a" {
                d2a_sealed.push(sealed);
            }
            plains.push(plain);
        }
        doc.blank();
    }

    let probe = link::encode_probe(&PROBE_NONCE);
    let probe_answer = link::answer_probe(d_id, &PROBE_NONCE, &mut rng(LINK_PROBE_SEED));
    assert_eq!(
        link::verify_probe_answer(&PROBE_NONCE, &probe_answer).expect("probe").fingerprint(),
        d_id.fingerprint()
    );
    doc.kv("probe.key", "id0_2048.pem");
    doc.rng_seed("probe.rng_seed", LINK_PROBE_SEED);
    doc.hex("probe.nonce", &PROBE_NONCE);
    doc.hex("probe.request", &probe);
    doc.hex("probe.answer", &probe_answer);
    doc.write(&out.join("link").join("handshake.txt"));
    LinkVector {
        hello,
        reply,
        auth,
        auth_plain,
        auth_reply,
        auth_reply_plain,
        d2a_sealed,
        plains,
        probe: probe.to_vec(),
        probe_answer,
    }
}

// ---------------------------------------------------------------------------------------------------------------
// (d) plaintext cells

fn cells_vector(out: &Path, tc0: &[u8; TC_LEN]) {
    let mut doc = Doc::new(&format!(
        "anomos-proto known-answer vectors: encoded plaintext cells, one or more per command.
cell.N.name      label
cell.N.circ_id   circuit id (u32, 8 hex digits)
cell.N.window    PADDING only: the receive window in the payload's first two bytes (0 = keepalive)
cell.N.command   command byte (0 PADDING, 1 OPEN, 2 CONFIRM, 3 DENY, 4 DATA, 5 BREAK, 6 ACK_BREAK, 7 SENDME)
cell.N.reason    DENY/BREAK: reason code (u8)
cell.N.tag       DENY/BREAK: replay tag (16 bytes) or `none`
cell.N.credit    SENDME: credit (u16)
cell.N.tc        OPEN: the tracking code it carries (= ../tc/tc_3hop.txt hop.0.tc)
cell.N.payload   DATA: the whole {CELL_PAYLOAD_LEN}-byte payload (from cells.data.rng_seed)
cell.N.hex       the {CELL_LEN}-byte plaintext cell: circ_id u32 BE | command u8 | payload zero-filled after its
                 fields (DENY/BREAK: reason u8 | has_tag u8 | tag[16]; SENDME: credit u16 BE; OPEN: tc)
{FORMAT}"
    ));
    doc.rng_seed("cells.data.rng_seed", CELLS_DATA_SEED);
    doc.blank();
    let mut data = Cell::new(0x8000_0003, Command::Data);
    data.payload = random_payload(CELLS_DATA_SEED);
    let tag: [u8; 16] = core::array::from_fn(|i| 0xa0 + i as u8);
    let cells: Vec<(&str, Cell)> = vec![
        ("padding", Cell::padding()),
        ("link_params", Cell::link_params(128)),
        ("open", Cell::open(0x8000_0001, tc0)),
        ("confirm", Cell::new(0x8000_0001, Command::Confirm)),
        ("deny_with_tag", Cell::deny(0x0000_0002, DenyReason::Replayed, Some(tag))),
        ("deny_without_tag", Cell::deny(0x0000_0002, DenyReason::NoSuchChain, None)),
        ("deny_unknown_reason", Cell::deny(0x0000_0002, DenyReason::Other(200), None)),
        ("data", data),
        ("break_with_tag", Cell::brk(0x7fff_ffff, BreakReason::LinkFailed, Some(tag))),
        ("break_without_tag", Cell::brk(0x7fff_ffff, BreakReason::Finished, None)),
        ("ack_break", Cell::new(0x7fff_ffff, Command::AckBreak)),
        ("sendme", Cell::sendme(0xffff_ffff, 0x1234)),
    ];
    for (n, (name, c)) in cells.iter().enumerate() {
        let p = format!("cell.{n}");
        doc.kv(&format!("{p}.name"), name);
        doc.kv(&format!("{p}.circ_id"), format!("{:08x}", c.circ_id));
        doc.kv(&format!("{p}.command"), c.command as u8);
        match c.command {
            Command::Deny => {
                let (r, t) = c.deny_fields().expect("deny");
                doc.kv(&format!("{p}.reason"), r.code());
                doc.kv(&format!("{p}.tag"), t.map(hex::encode).unwrap_or_else(|| "none".into()));
            }
            Command::Break => {
                let (r, t) = c.break_fields().expect("break");
                doc.kv(&format!("{p}.reason"), r.code());
                doc.kv(&format!("{p}.tag"), t.map(hex::encode).unwrap_or_else(|| "none".into()));
            }
            Command::Sendme => doc.kv(&format!("{p}.credit"), c.sendme_credit().expect("credit")),
            Command::Open => doc.hex(&format!("{p}.tc"), &c.open_tc().expect("tc")),
            Command::Data => doc.hex(&format!("{p}.payload"), &c.payload[..]),
            Command::Padding => doc.kv(&format!("{p}.window"), u16::from_be_bytes([c.payload[0], c.payload[1]])),
            _ => {}
        }
        let mut buf = [0u8; CELL_LEN];
        c.encode_into(&mut buf);
        assert_eq!(&Cell::decode(&buf).expect("decode"), c);
        doc.hex(&format!("{p}.hex"), &buf);
        doc.blank();
    }
    doc.write(&out.join("cells").join("cells.txt"));
}

// ---------------------------------------------------------------------------------------------------------------
// (e) tracker channel

struct TrackerVector {
    client_hello: Vec<u8>,
    /// The session's resumption secret (both ends).
    resumption: Secret,
    /// (direction is p2t, bincode plaintext, frame)
    frames: Vec<(bool, Vec<u8>, Vec<u8>)>,
}

fn tracker_vector(out: &Path, ids: &[Identity]) -> TrackerVector {
    let (t_id, p_id) = (&ids[2], &ids[0]);
    let mut prng = rng(TRACKER_PEER_SEED);
    let mut trng = rng(TRACKER_SEED);
    // The peer's rng yields its X25519 secret first, then the channel secret; the tracker's its X25519 secret.
    let (mut e_p_secret, mut s, mut e_t_secret) = ([0u8; 32], [0u8; 32], [0u8; 32]);
    {
        let mut p = prng.clone();
        p.fill_bytes(&mut e_p_secret);
        p.fill_bytes(&mut s);
        trng.clone().fill_bytes(&mut e_t_secret);
    }
    let (client_hello, handshake) = TrackerChannel::connect(&mut prng, t_id.public()).expect("connect");
    let ct_len = TrackerChannel::hello_ct_len(&client_hello[..CLIENT_HELLO_HEADER]).expect("hello header");
    assert_eq!(client_hello.len(), CLIENT_HELLO_HEADER + ct_len + EPHEMERAL_LEN);
    let (server_hello, mut trk) =
        TrackerChannel::accept(&mut trng, t_id, &client_hello[CLIENT_HELLO_HEADER..]).expect("accept");
    let mut peer = handshake.finish(&server_hello).expect("finish");
    let tfp = t_id.fingerprint();
    let e_p = *x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(e_p_secret)).as_bytes();
    let e_t = *x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(e_t_secret)).as_bytes();
    assert_eq!(&client_hello[CLIENT_HELLO_HEADER + ct_len..], &e_p, "peer ephemeral key");
    assert_eq!(server_hello, e_t, "tracker ephemeral key");
    let dh =
        *x25519_dalek::StaticSecret::from(e_p_secret).diffie_hellman(&x25519_dalek::PublicKey::from(e_t)).as_bytes();
    let salt = anomos_proto::crypto::sha256(&[b"anomos tracker v1", &e_p, &e_t]);
    let k_p2t = kdf(&salt, &[&s, &tfp.0, &dh], b"p2t");
    let k_t2p = kdf(&salt, &[&s, &tfp.0, &dh], b"t2p");

    let mut nonce = [0u8; 32];
    trng.fill_bytes(&mut nonce);
    let challenge = FromTracker::Challenge { nonce };
    let hello = tracker::make_hello(p_id, &tfp, &nonce, &mut prng);
    let welcome = FromTracker::Welcome { peer_id: p_id.fingerprint() };
    let announce = ToTracker::Announce(Announce {
        listen: "127.0.0.1:18444".parse().expect("addr"),
        chains: vec![ChainId::new("regtest").expect("chain"), ChainId::new("signet").expect("chain")],
        family: vec![],
    });
    let reply = FromTracker::Announced(AnnounceReply {
        interval_secs: 600,
        neighbors: vec![
            NeighborInfo {
                id: NeighborId(LINK_NID),
                addr: "127.0.0.2:18444".parse().expect("addr"),
                public_key: ids[1].public().der().to_vec(),
            },
            NeighborInfo {
                id: NeighborId(0xfedc_ba98_7654_3210),
                addr: "[::1]:18445".parse().expect("addr"),
                public_key: ids[3].public().der().to_vec(),
            },
        ],
    });

    let mut doc = Doc::new(&format!(
        "anomos-proto known-answer vectors: a tracker channel transcript.
Tracker = ../keys/id2_2048.pem, peer = ../keys/id0_2048.pem. Each side uses ONE rng, in protocol order
(peer: TrackerChannel::connect, then make_hello; tracker: TrackerChannel::accept, then 32 bytes of nonce).
client_hello        \"ANOMOST1\" | version u16 BE | ct_len u16 BE | RSA-OAEP-SHA256(tracker key, channel_secret) | e_p
peer_x25519_secret  the first 32 bytes of the peer's rng; e_p = X25519(secret, 9)
channel_secret      s: the next 32 bytes of the peer's rng
server_hello        e_t, the tracker's X25519 public key (sent in clear); its secret = first 32 bytes of the
                    tracker's rng
dh                  X25519(peer secret, e_t)
k_p2t, k_t2p        HKDF-SHA256(salt=SHA256(\"anomos tracker v1\" || e_p || e_t), ikm=s || tracker fingerprint || dh,
                    info=\"p2t\" / \"t2p\")
frame.N.dir         p2t (peer to tracker) or t2p
frame.N.type        the message variant (ToTracker::* for p2t, FromTracker::* for t2p)
frame.N.plain       bincode 1.3 DefaultOptions (varint, little endian) encoding of the message
frame.N.frame       the frame as sent: len u32 BE | AES-256-GCM(k, nonce = 0^4 || n u64 BE, aad=\"\", plain) || tag,
                    n counting frames per direction from 0
Message fields (for checking a decoder):
frame.0: Challenge.nonce (32 bytes, from the tracker's rng after accept)
frame.1: Hello.public_key (= peer SPKI DER), Hello.signature = RSA-PSS-SHA256(peer,
         \"anomos tracker hello v1\" | tracker fingerprint | nonce)
frame.2: Welcome.peer_id (= peer fingerprint)
frame.3: Announce.listen (socket address text), Announce.chains (comma separated), Announce.family (comma-separated hex fingerprints; empty here)
frame.4: Announced.interval_secs, Announced.neighbor.I.{{id (u64 hex), addr, public_key}}
{FORMAT}"
    ));
    doc.kv("tracker.key", "id2_2048.pem");
    doc.kv("peer.key", "id0_2048.pem");
    doc.rng_seed("peer.rng_seed", TRACKER_PEER_SEED);
    doc.rng_seed("tracker.rng_seed", TRACKER_SEED);
    doc.hex("client_hello", &client_hello);
    doc.hex("peer_x25519_secret", &e_p_secret);
    doc.hex("channel_secret", &s);
    doc.hex("server_hello", &server_hello);
    doc.hex("tracker_x25519_secret", &e_t_secret);
    doc.hex("dh", &dh);
    doc.hex("k_p2t", &k_p2t.0);
    doc.hex("k_t2p", &k_t2p.0);
    doc.blank();

    let mut frames = Vec::new();
    let mut chk_p2t = AeadCounter::new(&k_p2t);
    let mut chk_t2p = AeadCounter::new(&k_t2p);
    let mut emit = |doc: &mut Doc, n: usize, p2t: bool, ty: &str, plain: Vec<u8>, frame: Vec<u8>| {
        let chk = if p2t { &mut chk_p2t } else { &mut chk_t2p };
        assert_eq!(chk.seal(b"", &plain).expect("seal"), frame[4..].to_vec(), "derived channel key");
        doc.kv(&format!("frame.{n}.dir"), if p2t { "p2t" } else { "t2p" });
        doc.kv(&format!("frame.{n}.type"), ty);
        doc.hex(&format!("frame.{n}.plain"), &plain);
        doc.hex(&format!("frame.{n}.frame"), &frame);
        frames.push((p2t, plain, frame));
    };
    // 0: Challenge
    let f = trk.seal(&challenge).expect("seal");
    assert_eq!(peer.open::<FromTracker>(&f[4..]).expect("open"), challenge);
    emit(&mut doc, 0, false, "FromTracker::Challenge", tracker::encode(&challenge).expect("enc"), f);
    doc.hex("frame.0.nonce", &nonce);
    doc.blank();
    // 1: Hello
    let f = peer.seal(&hello).expect("seal");
    assert_eq!(trk.open::<ToTracker>(&f[4..]).expect("open"), hello);
    let ToTracker::Hello { public_key, signature } = &hello else { unreachable!() };
    tracker::verify_hello(public_key, signature, &tfp, &nonce).expect("hello verifies");
    emit(&mut doc, 1, true, "ToTracker::Hello", tracker::encode(&hello).expect("enc"), f);
    doc.hex("frame.1.public_key", public_key);
    doc.hex("frame.1.signature", signature);
    doc.blank();
    // 2: Welcome
    let f = trk.seal(&welcome).expect("seal");
    assert_eq!(peer.open::<FromTracker>(&f[4..]).expect("open"), welcome);
    emit(&mut doc, 2, false, "FromTracker::Welcome", tracker::encode(&welcome).expect("enc"), f);
    doc.hex("frame.2.peer_id", &p_id.fingerprint().0);
    doc.blank();
    // 3: Announce
    let f = peer.seal(&announce).expect("seal");
    assert_eq!(trk.open::<ToTracker>(&f[4..]).expect("open"), announce);
    emit(&mut doc, 3, true, "ToTracker::Announce", tracker::encode(&announce).expect("enc"), f);
    let ToTracker::Announce(a) = &announce else { unreachable!() };
    doc.kv("frame.3.listen", a.listen);
    doc.kv("frame.3.chains", a.chains.iter().map(|c| c.as_str()).collect::<Vec<_>>().join(","));
    doc.kv("frame.3.family", a.family.iter().map(|f| hex::encode(f.0)).collect::<Vec<_>>().join(","));
    doc.blank();
    // 4: Announced
    let f = trk.seal(&reply).expect("seal");
    assert_eq!(peer.open::<FromTracker>(&f[4..]).expect("open"), reply);
    emit(&mut doc, 4, false, "FromTracker::Announced", tracker::encode(&reply).expect("enc"), f);
    let FromTracker::Announced(r) = &reply else { unreachable!() };
    doc.kv("frame.4.interval_secs", r.interval_secs);
    for (i, nb) in r.neighbors.iter().enumerate() {
        doc.kv(&format!("frame.4.neighbor.{i}.id"), format!("{:016x}", nb.id.0));
        doc.kv(&format!("frame.4.neighbor.{i}.addr"), nb.addr);
        doc.hex(&format!("frame.4.neighbor.{i}.public_key"), &nb.public_key);
    }
    doc.write(&out.join("tracker").join("channel.txt"));
    assert_eq!(peer.resumption_secret(), trk.resumption_secret());
    assert_eq!(peer.resumption_secret(), &kdf(&salt, &[&s, &tfp.0, &dh], b"resume"));
    TrackerVector { client_hello, resumption: peer.resumption_secret().clone(), frames }
}

// ---------------------------------------------------------------------------------------------------------------
// (f) tracker session resumption (SPEC §3.4)

fn resume_vector(out: &Path, ids: &[Identity], tv: &TrackerVector) {
    let t_id = &ids[2];
    let tfp = t_id.fingerprint();
    let mut prng = rng(RESUME_PEER_SEED);
    let mut trng = rng(RESUME_TRACKER_SEED);
    // The tracker's rng yields the ticket id (16 bytes) when it issues the ticket, then its X25519 secret for the
    // resumed connection; the peer's its X25519 secret.
    let mut id = [0u8; tracker::TICKET_LEN];
    trng.fill_bytes(&mut id);
    let (mut e_p_secret, mut e_t_secret) = ([0u8; 32], [0u8; 32]);
    prng.clone().fill_bytes(&mut e_p_secret);
    trng.clone().fill_bytes(&mut e_t_secret);
    let ticket = tracker::Ticket { id, secret: tv.resumption.clone() };
    let issued = FromTracker::Ticket { ticket: id, lifetime_secs: 90 };
    let (hello, hs) = TrackerChannel::resume(&mut prng, &tfp, &ticket).expect("resume");
    let (got_id, e_p) = TrackerChannel::resume_hello(&hello).expect("parse");
    assert_eq!(got_id, id);
    let (answer, mut trk) = TrackerChannel::accept_resume(&mut trng, &tfp, &id, &tv.resumption, &e_p).expect("accept");
    let mut peer = hs.finish(&answer[1..]).expect("finish");
    let e_t: [u8; 32] = answer[1..].try_into().expect("e_t");
    let dh =
        *x25519_dalek::StaticSecret::from(e_p_secret).diffie_hellman(&x25519_dalek::PublicKey::from(e_t)).as_bytes();
    let salt = sha256(&[b"anomos tracker resume v1", &id, &e_p, &e_t]);
    let ikm: [&[u8]; 3] = [&tv.resumption.0, &tfp.0, &dh];
    let (k_p2t, k_t2p) = (kdf(&salt, &ikm, b"resume p2t"), kdf(&salt, &ikm, b"resume t2p"));

    let mut doc = Doc::new(&format!(
        "anomos-proto known-answer vectors: a tracker session resumed on a new connection (SPEC §3.4).
The session is the one of channel.txt (tracker = ../keys/id2_2048.pem). Each side uses ONE rng, in protocol order
(tracker: 16 bytes of ticket id when it issues the ticket, then TrackerChannel::accept_resume; peer:
TrackerChannel::resume).
resumption_secret   rs = HKDF-SHA256(salt=SHA256(\"anomos tracker v1\" || e_p || e_t), ikm=s || tracker fingerprint || dh,
                    info=\"resume\"), with e_p, e_t, s and dh of channel.txt
ticket_frame.plain  bincode of FromTracker::Ticket{{ticket, lifetime_secs = 90}}, the reply to ToTracker::Resumable
                    (whose bincode is resumable.plain)
ticket              the ticket id: the first 16 bytes of the tracker's rng
resume_hello        \"ANOMOSR1\" | version u16 BE | ticket | e_p
peer_x25519_secret  the first 32 bytes of the peer's rng; e_p = X25519(secret, 9)
resume_answer       0x00 (accepted) | e_t; the tracker's X25519 secret = the next 32 bytes of its rng
tracker_x25519_secret
dh                  X25519(peer secret, e_t)
k_p2t, k_t2p        HKDF-SHA256(salt=SHA256(\"anomos tracker resume v1\" || ticket || e_p || e_t),
                    ikm=rs || tracker fingerprint || dh, info=\"resume p2t\" / \"resume t2p\")
frame.N.*           as in channel.txt: frame.0 an Announce (p2t #0), frame.1 its Announced (t2p #0); counters start
                    at 0 on every connection
{FORMAT}"
    ));
    doc.kv("tracker.key", "id2_2048.pem");
    doc.rng_seed("peer.rng_seed", RESUME_PEER_SEED);
    doc.rng_seed("tracker.rng_seed", RESUME_TRACKER_SEED);
    doc.hex("resumption_secret", &tv.resumption.0);
    doc.hex("resumable.plain", &tracker::encode(&ToTracker::Resumable).expect("enc"));
    doc.hex("ticket_frame.plain", &tracker::encode(&issued).expect("enc"));
    doc.hex("ticket", &id);
    doc.hex("resume_hello", &hello);
    doc.hex("peer_x25519_secret", &e_p_secret);
    doc.hex("resume_answer", &answer);
    doc.hex("tracker_x25519_secret", &e_t_secret);
    doc.hex("dh", &dh);
    doc.hex("k_p2t", &k_p2t.0);
    doc.hex("k_t2p", &k_t2p.0);
    doc.blank();
    let (p2t_plain, t2p_plain) = (&tv.frames[3].1, &tv.frames[4].1);
    let announce: ToTracker = tracker::decode(p2t_plain).expect("announce");
    let reply: FromTracker = tracker::decode(t2p_plain).expect("reply");
    let f = peer.seal(&announce).expect("seal");
    assert_eq!(AeadCounter::new(&k_p2t).seal(b"", p2t_plain).expect("seal"), f[4..].to_vec(), "derived key");
    assert_eq!(trk.open::<ToTracker>(&f[4..]).expect("open"), announce);
    doc.kv("frame.0.dir", "p2t");
    doc.kv("frame.0.type", "ToTracker::Announce");
    doc.hex("frame.0.plain", p2t_plain);
    doc.hex("frame.0.frame", &f);
    let f = trk.seal(&reply).expect("seal");
    assert_eq!(AeadCounter::new(&k_t2p).seal(b"", t2p_plain).expect("seal"), f[4..].to_vec(), "derived key");
    assert_eq!(peer.open::<FromTracker>(&f[4..]).expect("open"), reply);
    doc.kv("frame.1.dir", "t2p");
    doc.kv("frame.1.type", "FromTracker::Announced");
    doc.hex("frame.1.plain", t2p_plain);
    doc.hex("frame.1.frame", &f);
    doc.write(&out.join("tracker").join("resume.txt"));
}

// ---------------------------------------------------------------------------------------------------------------
// fuzz seed corpora (formats: see proto/fuzz/fuzz_targets/*.rs)

fn fuzz_corpus(dir: &Path, tcv: &TcVector, lv: &LinkVector, tv: &TrackerVector, vectors: &Path) {
    let put = |target: &str, name: &str, bytes: &[u8]| {
        let d = dir.join(target);
        std::fs::create_dir_all(&d).expect("mkdir corpus");
        std::fs::write(d.join(name), bytes).expect("write seed");
    };
    let pre = |mode: u8, rest: &[u8]| [&[mode][..], rest].concat();
    // tc_peel: mode 0 = raw TC (peeled with id0), mode 1 = layer body plaintext sealed by the harness.
    put("tc_peel", "raw_tc0_for_id0", &pre(0, &tcv.tcs[0][..]));
    put("tc_peel", "raw_tc1_wrong_key", &pre(0, &tcv.tcs[1][..]));
    for (i, b) in tcv.bodies.iter().enumerate() {
        put("tc_peel", &format!("body_hop{i}"), &pre(1, b));
    }
    // handshake: 0 = HELLO || AUTH into an acceptor, 1 = AUTH plaintext, 2 = REPLY || AUTH_REPLY into a dialer,
    // 3 = AUTH_REPLY plaintext.
    put("handshake", "hello_auth", &pre(0, &[&lv.hello[..], &lv.auth].concat()));
    put("handshake", "auth_plain", &pre(1, &lv.auth_plain));
    put("handshake", "reply_auth_reply", &pre(2, &[&lv.reply[..], &lv.auth_reply].concat()));
    put("handshake", "auth_reply_plain", &pre(3, &lv.auth_reply_plain));
    put("handshake", "auth_reply_refusal", &pre(3, &[1u8]));
    // cell_open: 0 = sealed cell, 1 = Cell::decode on raw bytes, 2 = plaintext cell sealed by the harness.
    for (i, s) in lv.d2a_sealed.iter().enumerate() {
        put("cell_open", &format!("sealed_d2a_{i}"), &pre(0, &s[..]));
    }
    let cells = std::fs::read_to_string(vectors.join("cells").join("cells.txt")).expect("cells.txt");
    for line in cells.lines() {
        if let Some((k, v)) = line.split_once(" = ") {
            if let Some(n) = k.strip_prefix("cell.").and_then(|r| r.strip_suffix(".hex")) {
                let b = hex::decode(v).expect("hex");
                put("cell_open", &format!("plain_cell_{n}"), &pre(2, &b));
                put("cell_open", &format!("decode_cell_{n}"), &pre(1, &b));
            }
        }
    }
    for (i, p) in lv.plains.iter().enumerate().take(3) {
        put("cell_open", &format!("plain_link_{i}"), &pre(2, p));
    }
    // tracker_msg: 0 = ToTracker bincode, 1 = FromTracker bincode, 2 = ClientHello header, 3 = length prefixes and
    // probe body, 4 = probe answer, 5 = ToTracker plaintext through a channel.
    for (i, (p2t, plain, frame)) in tv.frames.iter().enumerate() {
        put("tracker_msg", &format!("msg_{i}"), &pre(if *p2t { 0 } else { 1 }, plain));
        if *p2t {
            put("tracker_msg", &format!("channel_{i}"), &pre(5, plain));
        }
        put("tracker_msg", &format!("frame_len_{i}"), &pre(3, &frame[..4]));
    }
    put("tracker_msg", "client_hello", &pre(2, &tv.client_hello));
    put("tracker_msg", "probe_body", &pre(3, &[&[0u8, 0, 0, 0][..], &lv.probe[8..]].concat()));
    put("tracker_msg", "probe_answer", &pre(4, &lv.probe_answer));
    // btc_envelope: 0 = wire bytes (envelopes), 1 = command index + payload.
    let caps = vectors.join("bitcoin").join("captures");
    if let Ok(rd) = std::fs::read_dir(&caps) {
        let mut names: Vec<_> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        names.sort();
        for p in names {
            let Ok(text) = std::fs::read_to_string(&p) else { continue };
            let Ok(wire) = hex::decode(text.trim()) else { continue };
            let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or("capture").to_string();
            put("btc_envelope", &format!("env_{stem}"), &pre(0, &wire));
            if wire.len() >= 24 {
                let cmd: String = wire[4..16].iter().take_while(|&&b| b != 0).map(|&b| b as char).collect();
                if let Some(ix) = anomos_proto::btc::MODELED_COMMANDS.iter().position(|c| *c == cmd) {
                    put("btc_envelope", &format!("payload_{stem}"), &pre(1, &[&[ix as u8][..], &wire[24..]].concat()));
                }
            }
        }
    }
    btc_seeds(&put, vectors);
    println!("wrote fuzz seed corpora under {}", dir.display());
}

/// btc_envelope seeds for every modeled command (the captures cover only some), and chain_import seeds: block
/// files in both formats built from the committed block vectors.
fn btc_seeds(put: &dyn Fn(&str, &str, &[u8]), vectors: &Path) {
    use anomos_proto::btc::import::{write_blk, write_hex_lines};
    use anomos_proto::btc::{
        Address, GetBlocksMessage, GetHeadersMessage, Inventory, Message, NetParams, Reject, ServiceFlags,
        VersionMessage, MODELED_COMMANDS,
    };
    use bitcoin::Block;

    let pre = |mode: u8, rest: &[u8]| [&[mode][..], rest].concat();
    let block = |name: &str| -> Block {
        let text = std::fs::read_to_string(vectors.join("bitcoin").join(name)).expect("block vector");
        bitcoin::consensus::deserialize(&hex::decode(text.trim()).expect("hex")).expect("block")
    };
    let genesis = block("mainnet_genesis.hex");
    let b1 = block("mainnet_block1.hex");
    let b2 = block("mainnet_block2.hex");
    let b170 = block("mainnet_block170.hex");
    let segwit = block("testnet3_block_4497b_segwit.hex");

    let magic = NetParams::regtest().magic;
    let addr = Address::new(&"127.0.0.1:18444".parse().expect("addr"), ServiceFlags::NETWORK);
    let inv = vec![Inventory::Block(b1.block_hash()), Inventory::Transaction(b170.txdata[1].compute_txid())];
    let locator = vec![b2.block_hash(), genesis.block_hash()];
    let messages = vec![
        Message::Version(VersionMessage::new(
            ServiceFlags::NONE,
            1_700_000_000,
            addr.clone(),
            addr.clone(),
            7,
            "/anomos:seed/".into(),
            0,
        )),
        Message::Verack,
        Message::Ping(1),
        Message::Pong(2),
        Message::GetAddr,
        Message::Addr(vec![(1_700_000_000, addr)]),
        Message::Inv(inv.clone()),
        Message::GetData(inv.clone()),
        Message::NotFound(inv),
        Message::GetHeaders(GetHeadersMessage::new(
            locator.clone(),
            <bitcoin::BlockHash as bitcoin::hashes::Hash>::all_zeros(),
        )),
        Message::Headers(vec![b1.header, b2.header]),
        Message::GetBlocks(GetBlocksMessage::new(locator, b2.block_hash())),
        Message::Block(b170.clone()),
        Message::Tx(segwit.txdata[1].clone()),
        Message::MemPool,
        Message::SendHeaders,
        Message::FeeFilter(1000),
        Message::Reject(Reject { message: "tx".into(), ccode: 0x10, reason: "bad-txns".into(), hash: Some([7; 32]) }),
    ];
    let mut stream = Vec::new();
    for msg in &messages {
        let command = msg.command();
        let ix = MODELED_COMMANDS.iter().position(|c| *c == command).expect("modeled command");
        let payload = msg.encode_payload();
        put("btc_envelope", &format!("gen_payload_{command}"), &pre(1, &[&[ix as u8][..], &payload].concat()));
        let wire = msg.to_envelope(magic).encode();
        put("btc_envelope", &format!("gen_env_{command}"), &pre(0, &wire));
        if payload.len() < 512 {
            stream.extend_from_slice(&wire);
        }
    }
    assert!(messages.len() == MODELED_COMMANDS.len(), "one seed message per modeled command");
    // EnvelopeReader: several envelopes pushed in 13-byte chunks.
    put("btc_envelope", "gen_reader_stream", &pre(2, &[&[12u8][..], &stream].concat()));

    // chain_import: 0 = parse_blocks, 1 = parse_blk, 2 = parse_hex_lines (mainnet magic).
    let main = NetParams::mainnet().magic;
    let chain = [genesis, b1, b2];
    let mut padded = write_blk(&chain, main);
    padded.extend_from_slice(&[0; 16]);
    put("chain_import", "blk_genesis_1_2_padded", &pre(0, &padded));
    put("chain_import", "hex_lines_1_2", &pre(0, format!("# mainnet\n{}", write_hex_lines(&chain[1..])).as_bytes()));
    let blk170 = write_blk(&[b170], main);
    put("chain_import", "blk_170_truncated", &pre(1, &blk170[..blk170.len() - 9]));
    put("chain_import", "blk_segwit", &pre(1, &write_blk(&[segwit], main)));
    put("chain_import", "hex_line_genesis", &pre(2, write_hex_lines(&chain[..1]).as_bytes()));
}
