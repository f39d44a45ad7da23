//! The tracker's state database (`<data-dir>/tracker.redb`, redb as the peer's chain store): peers with their
//! keys, addresses, chains, families and avoided marks, and every edge with its NeighborID. A restarted tracker
//! reads it back, so peers re-announce into the edges they had and their links stay up (SPEC §3.10 "Restart").
//!
//! Writes are batched: the graph collects what changed ([`Graph::take_changes`]) and the server writes it once a
//! second, off the async workers and outside the state lock. A steady announce changes nothing stored (announce
//! times are not stored: a restored peer counts as seen at the restart), so a steady tracker hardly writes. After
//! a crash the file is what the last commit left, at most a second behind: the difference is repaired by the
//! graph's ordinary rules (a peer's next announce reply carries its current edges).
//!
//! Everything read is checked: a row that does not decode within its byte limit, or a key that is not a valid
//! peer key, makes the load fail with an error naming the file; it never panics.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::ops::Bound;
use std::path::{Path, PathBuf};

use anomos_proto::identity::{Fingerprint, PublicKey};
use anomos_proto::ids::{ChainId, NeighborId};
use bincode::Options;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::TrackerError;
use crate::graph::{Dirty, Graph, Peer, Stored};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// Fingerprint (32 bytes) → [`PeerRow`] (bincode).
const PEERS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("peers");
/// NeighborID → the two ends' fingerprints (64 bytes).
const EDGES: TableDefinition<u64, &[u8]> = TableDefinition::new("edges");
/// Session tickets at shutdown (SPEC §3.4), [`TICKETS_PER_ROW`] to a row: row number (u32 BE) → records of
/// ticket id (16 bytes) | the peer's fingerprint (32) | the session's resumption secret (32) | seconds since the
/// ticket was last used (u32 BE). Read and deleted at start, so peers resume across a restart instead of all
/// doing a full handshake (an RSA decryption each) at once. (Before, each ticket had its row, keyed by its id:
/// 100,000 rows took half a second to write at shutdown. Such rows are still read.)
const TICKETS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("tickets");
/// Tickets in one row of [`TICKETS`].
const TICKETS_PER_ROW: usize = 8192;
/// One ticket's record in a row of [`TICKETS`].
const TICKET_RECORD: usize = 16 + 32 + 32 + 4;
/// Layout version written to `meta`.
const FORMAT: u8 = 1;
/// Largest peer row: a key (≤ 600 bytes DER), an address, up to 8 chains and 16 family members fit well within.
const MAX_ROW: u64 = 4096;

fn opts() -> impl Options {
    bincode::DefaultOptions::new().with_limit(MAX_ROW).reject_trailing_bytes()
}

/// A ticket from its id (16 bytes) and the rest of its record (fingerprint, secret, idle seconds).
fn ticket((id, rest): (&[u8], &[u8])) -> Option<StoredTicket> {
    let (peer, rest) = rest.split_at_checked(32)?;
    let (secret, idle) = rest.split_at_checked(32)?;
    Some(StoredTicket {
        id: id.try_into().ok()?,
        peer: Fingerprint(peer.try_into().ok()?),
        secret: secret.try_into().ok()?,
        idle_secs: u32::from_be_bytes(idle.try_into().ok()?),
    })
}

/// A stored peer.
#[derive(Debug, Serialize, Deserialize)]
struct PeerRow {
    key: Vec<u8>,
    addr: SocketAddr,
    chains: Vec<ChainId>,
    family: Vec<Fingerprint>,
    avoided: bool,
}

/// A session ticket kept across a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoredTicket {
    pub(crate) id: [u8; 16],
    pub(crate) peer: Fingerprint,
    pub(crate) secret: [u8; 32],
    pub(crate) idle_secs: u32,
}

/// A peer's stored row (the same bytes in redb and, for replicas, in etcd).
pub(crate) fn encode_peer(p: &Peer<PublicKey>) -> Option<Vec<u8>> {
    let row = PeerRow {
        key: p.key.der().to_vec(),
        addr: p.addr,
        chains: p.chains.clone(),
        family: p.family.clone(),
        avoided: p.avoided,
    };
    opts().serialize(&row).ok()
}

/// Decodes peer `fp`'s row, checked: within its byte limit, a valid key whose fingerprint is `fp`.
pub(crate) fn decode_peer(fp: &Fingerprint, bytes: &[u8]) -> Result<Stored<PublicKey>, String> {
    let row: PeerRow = opts().deserialize(bytes).map_err(|e| format!("peer {}: {e}", fp.short()))?;
    let key = PublicKey::from_der(&row.key).map_err(|e| format!("peer {}: {e}", fp.short()))?;
    if key.fingerprint() != *fp {
        return Err(format!("peer {}: its key has another fingerprint", fp.short()));
    }
    Ok(Stored { key, addr: row.addr, chains: row.chains, family: row.family, avoided: row.avoided })
}

/// A range of peer rows: bounds on their keys.
type KeyRange<'a> = (Bound<&'a [u8]>, Bound<&'a [u8]>);

/// What the database held.
#[derive(Debug, Default)]
pub(crate) struct Loaded {
    pub(crate) peers: Vec<(Fingerprint, Stored<PublicKey>)>,
    pub(crate) edges: Vec<(NeighborId, Fingerprint, Fingerprint)>,
}

/// Rows to write: `None` deletes.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    peers: Vec<(Fingerprint, Option<Vec<u8>>)>,
    edges: Vec<(NeighborId, Option<[u8; 64]>)>,
}

impl Batch {
    /// Adds the current rows of `peers` and `edges` (those no longer in `graph` are deleted).
    pub(crate) fn add(&mut self, graph: &Graph<PublicKey>, peers: &[Fingerprint], edges: &[NeighborId]) {
        self.peers.extend(peers.iter().map(|fp| (*fp, graph.get(fp).and_then(encode_peer))));
        self.edges.extend(edges.iter().map(|nid| {
            let ends = graph.edge_ends(*nid).map(|(a, b)| {
                let mut v = [0u8; 64];
                let (x, y) = v.split_at_mut(32);
                x.copy_from_slice(&a.0);
                y.copy_from_slice(&b.0);
                v
            });
            (*nid, ends)
        }));
    }

    /// Rows in the batch.
    pub(crate) fn len(&self) -> usize {
        self.peers.len() + self.edges.len()
    }

    /// What the batch covers, to mark it changed again when writing it failed.
    pub(crate) fn dirty(&self) -> Dirty {
        Dirty {
            peers: self.peers.iter().map(|(fp, _)| *fp).collect(),
            edges: self.edges.iter().map(|(nid, _)| *nid).collect::<HashSet<_>>(),
            ..Dirty::default()
        }
    }
}

/// The open database.
pub(crate) struct Store {
    db: Database,
    path: PathBuf,
}

impl Store {
    fn err(&self, e: impl std::fmt::Display) -> TrackerError {
        err(&self.path, e)
    }

    /// Opens (creating if needed) the database at `path`. A file that is not a redb database, or one of another
    /// layout, is an error naming it.
    pub(crate) fn open(path: &Path) -> Result<Store, TrackerError> {
        let db = Database::create(path).map_err(|e| err(path, e))?;
        let store = Store { db, path: path.to_path_buf() };
        let tx = store.db.begin_write().map_err(|e| store.err(e))?;
        {
            let mut meta = tx.open_table(META).map_err(|e| store.err(e))?;
            let format = meta.get("format").map_err(|e| store.err(e))?.map(|v| v.value().to_vec());
            match format.as_deref() {
                None => {
                    meta.insert("format", [FORMAT].as_slice()).map_err(|e| store.err(e))?;
                }
                Some([FORMAT]) => {}
                Some(other) => {
                    return Err(store.err(format!(
                        "layout {other:?}, this tracker reads layout [{FORMAT}]; move the file away to start with \
                         an empty graph"
                    )))
                }
            }
            tx.open_table(PEERS).map_err(|e| store.err(e))?;
            tx.open_table(EDGES).map_err(|e| store.err(e))?;
            tx.open_table(TICKETS).map_err(|e| store.err(e))?;
        }
        tx.commit().map_err(|e| store.err(e))?;
        Ok(store)
    }

    /// Replaces the stored tickets with `tickets` (at shutdown).
    pub(crate) fn save_tickets(&self, tickets: &[StoredTicket]) -> Result<(), TrackerError> {
        let mut tx = self.db.begin_write().map_err(|e| self.err(e))?;
        tx.set_durability(Durability::Immediate).map_err(|e| self.err(e))?;
        {
            let mut t = tx.open_table(TICKETS).map_err(|e| self.err(e))?;
            t.retain(|_, _| false).map_err(|e| self.err(e))?;
            for (n, chunk) in (0u32..).zip(tickets.chunks(TICKETS_PER_ROW)) {
                let mut row = Vec::with_capacity(chunk.len() * TICKET_RECORD);
                for st in chunk {
                    row.extend_from_slice(&st.id);
                    row.extend_from_slice(&st.peer.0);
                    row.extend_from_slice(&st.secret);
                    row.extend_from_slice(&st.idle_secs.to_be_bytes());
                }
                t.insert(n.to_be_bytes().as_slice(), row.as_slice()).map_err(|e| self.err(e))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// Reads the stored tickets and deletes them (at start: the secrets stay on disk only while the tracker is
    /// down). Rows of the wrong shape are skipped: a ticket is only an optimization.
    pub(crate) fn take_tickets(&self) -> Result<Vec<StoredTicket>, TrackerError> {
        let mut out = Vec::new();
        let mut tx = self.db.begin_write().map_err(|e| self.err(e))?;
        tx.set_durability(Durability::Immediate).map_err(|e| self.err(e))?;
        {
            let mut t = tx.open_table(TICKETS).map_err(|e| self.err(e))?;
            for item in t.iter().map_err(|e| self.err(e))? {
                let (k, v) = item.map_err(|e| self.err(e))?;
                match (k.value().len(), v.value()) {
                    // A row of records.
                    (4, v) if v.len() % TICKET_RECORD == 0 => {
                        out.extend(v.chunks_exact(TICKET_RECORD).filter_map(|r| ticket(r.split_at_checked(16)?)));
                    }
                    // A ticket's own row (the layout before).
                    (16, v) => out.extend(ticket((k.value(), v))),
                    _ => {}
                }
            }
            t.retain(|_, _| false).map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))?;
        Ok(out)
    }

    /// Reads every peer and edge. Peer rows (each a key to parse and check: most of a restart's read at 100,000
    /// peers) are read and decoded on up to 4 threads, each over its own range of fingerprints in its own read
    /// transaction, while this thread reads the edges; the peers stay in key order.
    pub(crate) fn load(&self) -> Result<Loaded, TrackerError> {
        self.load_on(std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 4))
    }

    fn damaged(&self, what: String) -> TrackerError {
        self.err(format!("{what}: the file is damaged; move it away to start with an empty graph"))
    }

    /// [`load`](Self::load) with the peer rows split into `threads` ranges.
    fn load_on(&self, threads: usize) -> Result<Loaded, TrackerError> {
        // Range t holds the fingerprints whose first byte is in [256·t/T, 256·(t+1)/T); the first and last are
        // open-ended, so a key of any length is read (and refused) by one of them.
        let threads = threads.clamp(1, 256);
        let firsts: Vec<[u8; 1]> = (1..threads).map(|t| [(256 * t / threads) as u8]).collect();
        let ranges: Vec<KeyRange<'_>> = (0..threads)
            .map(|t| {
                let lo = t.checked_sub(1).and_then(|i| firsts.get(i));
                let hi = firsts.get(t);
                (
                    lo.map_or(Bound::Unbounded, |k| Bound::Included(&k[..])),
                    hi.map_or(Bound::Unbounded, |k| Bound::Excluded(&k[..])),
                )
            })
            .collect();
        let (parts, edges) = std::thread::scope(|s| {
            // A range whose thread cannot be started (a process limit) is read here afterwards instead.
            let started: Vec<_> = ranges
                .iter()
                .map(|&r| (r, std::thread::Builder::new().spawn_scoped(s, move || self.read_peers(r)).ok()))
                .collect();
            let edges = self.read_edges();
            let parts: Vec<_> = started
                .into_iter()
                .map(|(r, handle)| match handle {
                    Some(h) => h.join().unwrap_or_else(|_| Err(self.damaged("reading peer rows panicked".into()))),
                    None => self.read_peers(r),
                })
                .collect();
            (parts, edges)
        });
        let mut out = Loaded { peers: Vec::new(), edges: edges? };
        for part in parts {
            let part = part?;
            out.peers.reserve(part.len());
            out.peers.extend(part);
        }
        Ok(out)
    }

    /// Reads and decodes the peer rows in `range`, in key order.
    fn read_peers(&self, range: KeyRange<'_>) -> Result<Vec<(Fingerprint, Stored<PublicKey>)>, TrackerError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let peers = tx.open_table(PEERS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for item in peers.range::<&[u8]>(range).map_err(|e| self.err(e))? {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let fp = <[u8; 32]>::try_from(k.value())
                .map(Fingerprint)
                .map_err(|_| self.damaged("a peer key of the wrong length".into()))?;
            out.push((fp, decode_peer(&fp, v.value()).map_err(|e| self.damaged(e))?));
        }
        Ok(out)
    }

    /// Reads every edge, in NeighborID order.
    fn read_edges(&self) -> Result<Vec<(NeighborId, Fingerprint, Fingerprint)>, TrackerError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let edges = tx.open_table(EDGES).map_err(|e| self.err(e))?;
        let mut out = Vec::with_capacity(usize::try_from(edges.len().map_err(|e| self.err(e))?).unwrap_or(0));
        for item in edges.iter().map_err(|e| self.err(e))? {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let (a, b) = v.value().split_at_checked(32).ok_or_else(|| self.damaged(format!("edge {}", k.value())))?;
            let (Ok(a), Ok(b)) = (<[u8; 32]>::try_from(a), <[u8; 32]>::try_from(b)) else {
                return Err(self.damaged(format!("edge {}: ends of the wrong length", k.value())));
            };
            out.push((NeighborId(k.value()), Fingerprint(a), Fingerprint(b)));
        }
        Ok(out)
    }

    /// Writes a batch in one transaction, synced to disk before it returns.
    pub(crate) fn write(&self, batch: &Batch) -> Result<(), TrackerError> {
        let mut tx = self.db.begin_write().map_err(|e| self.err(e))?;
        tx.set_durability(Durability::Immediate).map_err(|e| self.err(e))?;
        {
            let mut peers = tx.open_table(PEERS).map_err(|e| self.err(e))?;
            for (fp, row) in &batch.peers {
                match row {
                    Some(row) => peers.insert(fp.0.as_slice(), row.as_slice()).map(drop),
                    None => peers.remove(fp.0.as_slice()).map(drop),
                }
                .map_err(|e| self.err(e))?;
            }
            let mut edges = tx.open_table(EDGES).map_err(|e| self.err(e))?;
            for (nid, ends) in &batch.edges {
                match ends {
                    Some(ends) => edges.insert(nid.0, ends.as_slice()).map(drop),
                    None => edges.remove(nid.0).map(drop),
                }
                .map_err(|e| self.err(e))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }
}

fn err(path: &Path, e: impl std::fmt::Display) -> TrackerError {
    TrackerError::Store { path: path.display().to_string(), message: e.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_are_kept_across_a_restart_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tracker.redb");
        let t = |i: u8| StoredTicket { id: [i; 16], peer: Fingerprint([i; 32]), secret: [i + 1; 32], idle_secs: 7 };
        {
            let store = Store::open(&path).unwrap();
            store.save_tickets(&[t(1), t(2)]).unwrap();
            store.save_tickets(&[t(3)]).unwrap(); // replaces
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.take_tickets().unwrap(), vec![t(3)]);
        assert!(store.take_tickets().unwrap().is_empty(), "read once: deleted at start");

        // More tickets than a row holds, and a ticket's own row as the layout before wrote it.
        let many: Vec<StoredTicket> = (0..2 * TICKETS_PER_ROW + 5)
            .map(|i| StoredTicket {
                id: (i as u128).to_be_bytes(),
                peer: Fingerprint([i as u8; 32]),
                secret: [(i >> 8) as u8; 32],
                idle_secs: i as u32,
            })
            .collect();
        store.save_tickets(&many).unwrap();
        let tx = store.db.begin_write().unwrap();
        {
            let mut rows = tx.open_table(TICKETS).unwrap();
            assert_eq!(rows.len().unwrap(), 3);
            let old = [&[4u8; 32][..], &[5u8; 32], &7u32.to_be_bytes()].concat();
            rows.insert([9u8; 16].as_slice(), old.as_slice()).unwrap();
            rows.insert([1u8; 3].as_slice(), [0u8; 84].as_slice()).unwrap(); // neither layout: skipped
        }
        tx.commit().unwrap();
        let mut back = store.take_tickets().unwrap();
        let old = StoredTicket { id: [9; 16], peer: Fingerprint([4; 32]), secret: [5; 32], idle_secs: 7 };
        assert_eq!(back.iter().filter(|t| **t == old).count(), 1);
        back.retain(|t| *t != old);
        assert_eq!(back, many);
    }

    #[test]
    fn peer_rows_read_on_several_threads_come_back_in_key_order_and_the_first_bad_one_is_named() {
        let keys: Vec<PublicKey> = [
            include_str!("../../proto/tests/vectors/keys/id0_2048.pem"),
            include_str!("../../proto/tests/vectors/keys/id1_2048.pem"),
            include_str!("../../proto/tests/vectors/keys/id2_2048.pem"),
            include_str!("../../proto/tests/vectors/keys/id3_3072.pem"),
        ]
        .iter()
        .map(|pem| anomos_proto::identity::Identity::from_pkcs8_pem(pem).unwrap().public().clone())
        .collect();
        let row = |key: &PublicKey, port: u16| {
            let p = PeerRow {
                key: key.der().to_vec(),
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                chains: vec![],
                family: vec![],
                avoided: false,
            };
            opts().serialize(&p).unwrap()
        };
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("tracker.redb")).unwrap();
        let tx = store.db.begin_write().unwrap();
        {
            let mut t = tx.open_table(PEERS).unwrap();
            for (i, k) in keys.iter().enumerate() {
                t.insert(k.fingerprint().0.as_slice(), row(k, i as u16 + 1).as_slice()).unwrap();
            }
            let mut e = tx.open_table(EDGES).unwrap();
            let ends = [keys[0].fingerprint().0, keys[1].fingerprint().0].concat();
            e.insert(9u64, ends.as_slice()).unwrap();
        }
        tx.commit().unwrap();
        let mut want: Vec<Fingerprint> = keys.iter().map(PublicKey::fingerprint).collect();
        want.sort();
        // One range, two, three, and more ranges than rows (empty ones between): every row once, in key order.
        for threads in [1, 2, 3, 16, 256] {
            let got = store.load_on(threads).unwrap();
            assert_eq!(got.peers.iter().map(|(fp, _)| *fp).collect::<Vec<_>>(), want, "{threads} threads");
            for (fp, s) in &got.peers {
                let i = keys.iter().position(|k| k.fingerprint() == *fp).unwrap();
                assert_eq!(usize::from(s.addr.port()), i + 1);
            }
            assert_eq!(got.edges, vec![(NeighborId(9), keys[0].fingerprint(), keys[1].fingerprint())]);
        }
        // A row whose key is not its fingerprint's, near the end of the key space: the load fails naming it.
        let tx = store.db.begin_write().unwrap();
        tx.open_table(PEERS).unwrap().insert([0xfe; 32].as_slice(), row(&keys[0], 9).as_slice()).unwrap();
        tx.commit().unwrap();
        for threads in [1, 2, 16] {
            let e = store.load_on(threads).unwrap_err().to_string();
            assert!(e.contains(&Fingerprint([0xfe; 32]).short()) && e.contains("another fingerprint"), "{e}");
        }
    }

    #[test]
    fn garbage_and_damaged_rows_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tracker.redb");
        std::fs::write(&path, vec![0x5a; 10_000]).unwrap();
        let e = Store::open(&path).err().expect("garbage opened").to_string();
        assert!(e.contains("tracker.redb"), "{e}");

        let path = dir.path().join("rows.redb");
        let store = Store::open(&path).unwrap();
        let tx = store.db.begin_write().unwrap();
        tx.open_table(PEERS).unwrap().insert([7u8; 32].as_slice(), [0xffu8; 40].as_slice()).unwrap();
        tx.commit().unwrap();
        let e = store.load().unwrap_err().to_string();
        assert!(e.contains("rows.redb") && e.contains("damaged"), "{e}");

        let path = dir.path().join("edges.redb");
        let store = Store::open(&path).unwrap();
        let tx = store.db.begin_write().unwrap();
        tx.open_table(EDGES).unwrap().insert(5u64, [1u8; 10].as_slice()).unwrap();
        tx.commit().unwrap();
        assert!(store.load().unwrap_err().to_string().contains("damaged"));
    }
}
