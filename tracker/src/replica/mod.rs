//! Replicas: several tracker instances sharing one state through etcd (`--etcd`, SPEC §3.10 "Replicas").
//!
//! Each instance keeps the whole graph in memory, as a single tracker does, and serves circuit requests from it.
//! The shared state is etcd's; an instance's graph is a copy kept current by a watch. What lives where:
//!
//! | key (under `--etcd-prefix`) | value | lease |
//! |---|---|---|
//! | `p/<fingerprint hex>` | the peer's row (key, address, chains, family, avoided mark; as in `tracker.redb`) | the peer's own (TTL 3·I, kept alive by each announce, on whichever instance) |
//! | `e/<NeighborID hex>` | the edge's two ends (64 bytes, lower fingerprint first) | none |
//! | `r/<instance>` | a live instance's listen address | the instance's (5 s) |
//! | `cluster` | the tracker's fingerprint and graph settings every instance must share | none |
//!
//! An instance changes the state only in a transaction built here from what a request changed in its graph
//! ([`stage`]): every peer whose row or edges changed is compared at the revision the graph holds it at and written
//! (a new one must be absent; an edge change "touches" both ends' rows), and every new edge's key must be absent,
//! so NeighborIDs are unique, edges symmetric (one key per edge), no two edges join one pair and no degree grows
//! past what the instance saw. A transaction that fails because another instance got there first is a conflict:
//! the instance reads the keys it touched back ([`Truth`]), puts them into its graph, and does the request again.
//! Reports' effects on everyone (the avoided mark) are in the peer's row; blame, report windows, probes and the
//! issued circuits stay with the instance that received them.
//!
//! The etcd client is behind the `etcd` feature (its build needs `protoc`); the types here are not, so the service
//! compiles the same either way and the embedded store stays the default.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;

use anomos_proto::identity::{Fingerprint, PublicKey};
use anomos_proto::ids::NeighborId;

use crate::graph::{Dirty, Graph, Stored};

#[cfg(feature = "etcd")]
mod etcd;
#[cfg(feature = "etcd")]
mod watch;

/// A replica's connection to the shared state, opened before the service starts ([`open`]); [`Replica::start`]
/// starts its watch and its registration once the service runs.
pub(crate) struct Replica {
    #[cfg(feature = "etcd")]
    etcd: std::sync::Arc<etcd::Etcd>,
    #[cfg(feature = "etcd")]
    args: crate::config::TrackerArgs,
    #[cfg(feature = "etcd")]
    listen: std::net::SocketAddr,
    /// The revision the graph was loaded at.
    #[cfg(feature = "etcd")]
    revision: i64,
}

/// Connects to etcd (`--etcd`), checks that this instance belongs to the overlay stored there, and loads the graph.
pub(crate) async fn open(
    args: crate::config::TrackerArgs,
    fingerprint: Fingerprint,
    listen: std::net::SocketAddr,
) -> Result<(crate::service::Service, crate::service::Restored, Replica), crate::error::TrackerError> {
    #[cfg(feature = "etcd")]
    {
        let (service, restored, etcd, revision) = etcd::open(args.clone(), fingerprint).await?;
        Ok((service, restored, Replica { etcd, args, listen, revision }))
    }
    #[cfg(not(feature = "etcd"))]
    {
        let _ = (args, fingerprint, listen);
        Err(crate::error::TrackerError::Config("--etcd: this anomos-tracker was built without etcd support".into()))
    }
}

impl Replica {
    /// Starts the watch that keeps the graph current and the instance's registration, as tasks of `tasks`.
    pub(crate) fn start(self, service: &std::sync::Arc<crate::service::Service>, tasks: &mut tokio::task::JoinSet<()>) {
        #[cfg(feature = "etcd")]
        {
            let weak = std::sync::Arc::downgrade(service);
            tasks.spawn(watch::run(self.etcd.clone(), weak.clone(), self.args, self.revision + 1));
            tasks.spawn(etcd::register(self.etcd, self.listen, weak));
        }
        #[cfg(not(feature = "etcd"))]
        let _ = (self, service, tasks);
    }
}

/// A boxed future (the trait below is used as `dyn`).
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The lease id of a peer's record: its fingerprint's first 63 bits (never 0). Any instance can keep a peer's
/// lease alive without looking it up.
pub(crate) fn lease_id(fp: &Fingerprint) -> i64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(fp.0.get(..8).unwrap_or(&[0; 8]));
    let id = (u64::from_be_bytes(b) & (u64::MAX >> 1)) as i64;
    id.max(1)
}

/// What a transaction requires of the shared state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Check {
    /// The peer's record is at this modification revision (so neither it nor its edges changed since).
    PeerAt(Fingerprint, i64),
    /// The peer has no record (it is new).
    PeerAbsent(Fingerprint),
    /// No edge has this NeighborID.
    EdgeAbsent(NeighborId),
}

/// What a transaction writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Write {
    /// A peer's row; `Some(lease)` for a new record, `None` keeps the record's lease.
    Peer(Fingerprint, Vec<u8>, Option<i64>),
    /// A new revision of a peer's record, same value and lease: its edges changed.
    Touch(Fingerprint),
    /// A new edge.
    Edge(NeighborId, Fingerprint, Fingerprint),
    /// An edge removed.
    DeleteEdge(NeighborId),
}

/// One request's changes, as a transaction.
#[derive(Debug, Default, Clone)]
pub(crate) struct Staged {
    pub(crate) checks: Vec<Check>,
    pub(crate) writes: Vec<Write>,
    /// Peers whose records are created (their leases are granted first).
    pub(crate) new_peers: Vec<Fingerprint>,
    /// A peer whose lease the request keeps alive (the announcing peer, when it already has a record).
    pub(crate) keep_alive: Option<Fingerprint>,
}

impl Staged {
    /// Whether there is nothing to do.
    pub(crate) fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.keep_alive.is_none()
    }

    /// The peers and edges the transaction touches (to read back after a conflict).
    pub(crate) fn keys(&self) -> (Vec<Fingerprint>, Vec<NeighborId>) {
        let mut peers = BTreeSet::new();
        let mut edges = BTreeSet::new();
        for c in &self.checks {
            match c {
                Check::PeerAt(fp, _) | Check::PeerAbsent(fp) => {
                    peers.insert(*fp);
                }
                Check::EdgeAbsent(nid) => {
                    edges.insert(nid.0);
                }
            }
        }
        for w in &self.writes {
            match w {
                Write::Peer(fp, ..) | Write::Touch(fp) => {
                    peers.insert(*fp);
                }
                Write::Edge(nid, ..) | Write::DeleteEdge(nid) => {
                    edges.insert(nid.0);
                }
            }
        }
        peers.extend(self.keep_alive);
        (peers.into_iter().collect(), edges.into_iter().map(NeighborId).collect())
    }
}

/// The revisions at which this instance's graph holds each peer's record: (create revision, modification revision).
#[derive(Debug, Default)]
pub(crate) struct Revisions {
    pub(crate) peers: HashMap<Fingerprint, (i64, i64)>,
    /// The revision the watch has applied every change up to (the load's, then each event's).
    pub(crate) watched: i64,
    /// Keys changed here at a revision (by the watch or by this instance's own commits) within the last
    /// [`RECENT`]: keys read back at an older revision must not overwrite them.
    recent: HashMap<Key, (i64, std::time::Instant)>,
    recent_log: std::collections::VecDeque<(std::time::Instant, Key)>,
}

/// How long [`Revisions`] remembers which keys changed at which revision: far longer than a read back can take
/// (each etcd call is bounded by 3 s).
const RECENT: std::time::Duration = std::time::Duration::from_secs(15);

/// A key of the shared state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Key {
    Peer(Fingerprint),
    Edge(NeighborId),
}

impl Revisions {
    /// Records that `key` is held here as of `rev`.
    pub(crate) fn changed(&mut self, key: Key, rev: i64) {
        let now = std::time::Instant::now();
        let e = self.recent.entry(key).or_insert((rev, now));
        if e.0 <= rev {
            *e = (rev, now);
        }
        self.recent_log.push_back((now, key));
        while let Some((t, k)) = self.recent_log.front().copied() {
            if now.duration_since(t) < RECENT {
                break;
            }
            self.recent_log.pop_front();
            if self.recent.get(&k).is_some_and(|(_, at)| *at == t) {
                self.recent.remove(&k);
            }
        }
    }

    /// Whether this instance holds `key` at a revision later than `rev`.
    pub(crate) fn newer_than(&self, key: Key, rev: i64) -> bool {
        self.recent.get(&key).is_some_and(|(r, _)| *r > rev)
    }
}

/// A peer's record as read from the shared state.
#[derive(Debug, Clone)]
pub(crate) struct PeerRecord {
    pub(crate) stored: Stored<PublicKey>,
    pub(crate) create: i64,
    pub(crate) modified: i64,
}

/// An edge as read from the shared state.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EdgeRecord {
    pub(crate) a: Fingerprint,
    pub(crate) b: Fingerprint,
    pub(crate) create: i64,
}

/// Keys read back from the shared state at one revision (`None`: absent).
#[derive(Debug, Default)]
pub(crate) struct Truth {
    /// The revision read at.
    pub(crate) revision: i64,
    pub(crate) peers: Vec<(Fingerprint, Option<Box<PeerRecord>>)>,
    pub(crate) edges: Vec<(NeighborId, Option<EdgeRecord>)>,
}

/// A key's new state, from the watch or read back.
#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "etcd"), allow(dead_code))]
pub(crate) enum Change {
    /// A peer's record (None: deleted).
    Peer(Fingerprint, Option<Box<PeerRecord>>),
    /// An edge (None: deleted).
    Edge(NeighborId, Option<EdgeRecord>),
}

/// Why a commit did not happen.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(not(feature = "etcd"), allow(dead_code))]
pub(crate) enum CommitError {
    /// Another instance changed a key the transaction depends on: read back and try again.
    Conflict,
    /// The peer's lease had ended (its record is gone or going): drop it here and try again as a new peer.
    Expired(Fingerprint),
    /// etcd could not be reached or refused, or did not answer in time (the transaction may or may not have
    /// happened): the keys are read back and the request refused.
    Unavailable(String),
}

/// The shared state as the service uses it (implemented over etcd).
pub(crate) trait Shared: Send + Sync {
    /// `Err(why)` while this instance must not serve (cut off from etcd, or not yet synchronized).
    fn available(&self) -> Result<(), String>;
    /// The graph may differ from etcd in ways a read back could not repair: refuse requests until the whole state
    /// has been read again.
    fn lost(&self, why: String);
    /// Runs `staged` as one transaction (granting new peers' leases first and keeping the announcing peer's alive);
    /// returns the revision it committed at.
    fn commit<'a>(&'a self, staged: &'a Staged) -> BoxFuture<'a, Result<i64, CommitError>>;
    /// Reads peers and edges back as they were at revision `at` (0: the latest; [`Truth::revision`] says which).
    fn read<'a>(
        &'a self,
        peers: &'a [Fingerprint],
        edges: &'a [NeighborId],
        at: i64,
    ) -> BoxFuture<'a, Result<Truth, String>>;
}

/// Under the state lock, right after a request changed `graph`: the transaction that makes `dirty` (what it
/// changed) shared. `announcing` is the peer whose announce it was (its lease is kept alive).
pub(crate) fn stage(
    graph: &Graph<PublicKey>,
    revs: &Revisions,
    dirty: &Dirty,
    announcing: Option<Fingerprint>,
) -> Staged {
    let mut st = Staged::default();
    let mut touched: BTreeSet<Fingerprint> = dirty.peers.iter().copied().collect();
    for (a, b) in dirty.ends.values() {
        touched.insert(*a);
        touched.insert(*b);
    }
    touched.extend(announcing);
    for fp in touched {
        let Some(p) = graph.get(&fp) else { continue }; // gone here: its record's lease ends it there
        match revs.peers.get(&fp) {
            Some((_, modified)) => {
                st.checks.push(Check::PeerAt(fp, *modified));
                if dirty.peers.contains(&fp) {
                    st.writes.extend(crate::store::encode_peer(p).map(|row| Write::Peer(fp, row, None)));
                } else if dirty.ends.values().any(|(a, b)| *a == fp || *b == fp) {
                    st.writes.push(Write::Touch(fp));
                }
                if announcing == Some(fp) {
                    st.keep_alive = Some(fp);
                }
            }
            None => {
                st.checks.push(Check::PeerAbsent(fp));
                st.writes.extend(crate::store::encode_peer(p).map(|row| Write::Peer(fp, row, Some(lease_id(&fp)))));
                st.new_peers.push(fp);
            }
        }
    }
    let mut nids: Vec<&NeighborId> = dirty.edges.iter().collect();
    nids.sort_unstable_by_key(|n| n.0);
    for nid in nids {
        match graph.edge_ends(*nid) {
            Some((a, b)) => {
                st.checks.push(Check::EdgeAbsent(*nid));
                st.writes.push(Write::Edge(*nid, a, b));
            }
            // Removed (or made and removed by this same request: deleting an absent key changes nothing).
            None => st.writes.push(Write::DeleteEdge(*nid)),
        }
    }
    st
}

/// After `staged` committed at `rev`: the graph holds its records at that revision.
pub(crate) fn committed(revs: &mut Revisions, staged: &Staged, rev: i64) {
    for w in &staged.writes {
        match w {
            Write::Peer(fp, ..) | Write::Touch(fp) => revs.changed(Key::Peer(*fp), rev),
            Write::Edge(nid, ..) | Write::DeleteEdge(nid) => revs.changed(Key::Edge(*nid), rev),
        }
        match w {
            // The watch may already have brought a later revision: never go back.
            Write::Peer(fp, _, Some(_)) => {
                let r = revs.peers.entry(*fp).or_insert((rev, rev));
                if r.1 < rev {
                    *r = (rev, rev);
                }
            }
            Write::Peer(fp, _, None) | Write::Touch(fp) => {
                if let Some(r) = revs.peers.get_mut(fp) {
                    r.1 = r.1.max(rev);
                }
            }
            Write::Edge(..) | Write::DeleteEdge(_) => {}
        }
    }
}

/// Puts a peer's record (or its absence) into the graph; `now` is when it counts as seen. Returns the edges that
/// went with a removed peer.
pub(crate) fn apply_peer(
    graph: &mut Graph<PublicKey>,
    revs: &mut Revisions,
    fp: Fingerprint,
    record: Option<Box<PeerRecord>>,
    now: std::time::Instant,
) -> Vec<NeighborId> {
    match record {
        Some(r) => {
            if revs.peers.get(&fp).is_some_and(|(c, m)| *c == r.create && *m > r.modified) {
                return Vec::new(); // this instance already holds a later revision (its own commit)
            }
            if revs.peers.get(&fp).is_some_and(|(c, _)| *c != r.create) {
                // Another incarnation: the old one's edges are not the new one's.
                graph.remove_peer(&fp);
            }
            let PeerRecord { stored, create, modified } = *r;
            if graph.set_peer(fp, stored, now) {
                revs.peers.insert(fp, (create, modified));
            }
            Vec::new()
        }
        None => {
            revs.peers.remove(&fp);
            graph.remove_peer(&fp)
        }
    }
}

/// Puts an edge (or its absence) into the graph. An edge counts only if neither end's record is newer than it: an
/// edge left behind by a peer whose record expired and was created again is not the new record's.
pub(crate) fn apply_edge(graph: &mut Graph<PublicKey>, revs: &Revisions, nid: NeighborId, record: Option<EdgeRecord>) {
    match record {
        Some(e) => {
            if let Some((a, b)) = graph.edge_ends(nid) {
                if (a, b) == (e.a, e.b) || (a, b) == (e.b, e.a) {
                    return;
                }
                graph.unlink_edge(nid);
            }
            if edge_valid(revs, &e) {
                // The record is newer than whatever joins the two here under another id.
                if let Some(other) = graph.edge(&e.a, &e.b) {
                    graph.unlink_edge(other);
                }
                graph.restore_edge(nid, e.a, e.b);
            }
        }
        None => {
            graph.unlink_edge(nid);
        }
    }
}

/// Whether an edge record is valid against the peers' records (see [`apply_edge`]): neither end's record is newer
/// than the edge (a newcomer's record and its first edges are created in one transaction, at one revision).
pub(crate) fn edge_valid(revs: &Revisions, e: &EdgeRecord) -> bool {
    let older = |fp: &Fingerprint| revs.peers.get(fp).is_some_and(|(c, _)| *c <= e.create);
    older(&e.a) && older(&e.b)
}
