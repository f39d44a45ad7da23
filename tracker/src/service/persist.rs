//! Restoring the graph from the state database at start, and writing its changes back (see `crate::store`).

use super::*;
use crate::error::TrackerError;
use anomos_proto::ids::NeighborId;

use crate::graph::Dirty;
use crate::store::{Batch, Store};

/// Rows read under one hold of the state lock when writing: a join wave changes thousands of rows a second,
/// and reading them all at once would hold the lock for milliseconds.
const ROWS_PER_HOLD: usize = 512;

/// What a start restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Restored {
    pub(crate) peers: usize,
    pub(crate) edges: usize,
    /// Stored peers and edges that could not be put back (over `--max-peers`, an end missing, …); deleted.
    pub(crate) dropped: usize,
    /// Time reading and checking the rows, and putting the graph back together.
    pub(crate) read: Duration,
    pub(crate) rebuilt: Duration,
}

impl Service {
    /// The tickets kept across the last restart (read and deleted from the database), with their peers' keys.
    /// Tickets of peers the graph no longer holds are dropped.
    pub(crate) fn take_tickets(&self) -> Vec<(crate::store::StoredTicket, PublicKey)> {
        let Some(store) = self.store() else { return Vec::new() };
        let tickets = match store.take_tickets() {
            Ok(t) => t,
            Err(e) => {
                warn!(error = %e, "reading the kept session tickets failed: peers do a full handshake");
                return Vec::new();
            }
        };
        let st = self.lock("tickets at start");
        tickets.into_iter().filter_map(|t| st.graph.get(&t.peer).map(|p| (t, p.key.clone()))).collect()
    }

    /// Keeps the session tickets in the database until the next start (at shutdown).
    pub(crate) fn save_tickets(&self, tickets: &[crate::store::StoredTicket]) -> Result<(), TrackerError> {
        match self.store() {
            Some(store) => store.save_tickets(tickets),
            None => Ok(()),
        }
    }

    /// The state database, unless there is none or it is closed.
    fn store(&self) -> Option<Arc<Store>> {
        self.store.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Closes the state database (at shutdown, after the last write): it is closed cleanly, so the next start
    /// opens it at once instead of repairing it, whatever happens to the process afterwards. Blocking: a write
    /// still running (its task was stopped, its thread not) is waited for, up to `wait`. False if it was still
    /// running then (the database is closed when that write ends).
    pub(crate) fn close_store(&self, wait: std::time::Duration) -> bool {
        let taken = self.store.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        let Some(mut store) = taken else { return true };
        let until = std::time::Instant::now() + wait;
        loop {
            match Arc::try_unwrap(store) {
                Ok(store) => {
                    drop(store);
                    return true;
                }
                Err(shared) if std::time::Instant::now() < until => {
                    store = shared;
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(_) => return false,
            }
        }
    }

    /// Opens the state database (`<data-dir>/tracker.redb`) and restores the graph it holds: every stored peer is
    /// live from now, with its edges and their NeighborIDs.
    pub(crate) fn open(args: TrackerArgs) -> Result<(Service, Restored), TrackerError> {
        let started = std::time::Instant::now();
        let store = Store::open(&args.db_path())?;
        let loaded = store.load()?;
        let read = started.elapsed();
        let mut graph = Graph::new(args.graph_config());
        // Restored peers stay live for three of the intervals an overlay of their number is handed.
        graph.set_expire_after(TrackerArgs::expire_after_for(args.interval_for(loaded.peers.len())));
        graph.reserve(loaded.peers.len(), loaded.edges.len());
        let now = anomos_net::rt::now();
        let mut dropped = Dirty::default();
        let (mut peers, mut edges) = (0, 0);
        for (fp, stored) in loaded.peers {
            if graph.restore_peer(fp, stored, now) {
                peers += 1;
            } else {
                dropped.peers.insert(fp);
            }
        }
        let stored_edges = loaded.edges.len();
        let not_restored = graph.restore_edges(loaded.edges);
        edges += stored_edges - not_restored.len();
        dropped.edges.extend(not_restored);
        graph.track_changes();
        let rebuilt = started.elapsed().saturating_sub(read);
        let restored = Restored { peers, edges, dropped: dropped.peers.len() + dropped.edges.len(), read, rebuilt };
        for fp in dropped.peers {
            graph.forget_stored_peer(fp);
        }
        for nid in dropped.edges {
            graph.forget_stored_edge(nid);
        }
        Ok((Service::with_graph(args, graph, Some(Arc::new(store))), restored))
    }

    /// Writes what changed since the last call, in one transaction off the async workers; returns the rows
    /// written. On failure the changes stay marked and the next call tries again.
    pub(crate) async fn persist(&self) -> Result<usize, TrackerError> {
        let Some(store) = self.store() else { return Ok(0) };
        let dirty = self.lock("persist: changes").graph.take_changes();
        let peers: Vec<Fingerprint> = dirty.peers.into_iter().collect();
        let edges: Vec<NeighborId> = dirty.edges.into_iter().collect();
        if peers.is_empty() && edges.is_empty() {
            return Ok(0);
        }
        let mut batch = Batch::default();
        for chunk in peers.chunks(ROWS_PER_HOLD) {
            batch.add(&self.lock("persist: peer rows").graph, chunk, &[]);
        }
        for chunk in edges.chunks(ROWS_PER_HOLD) {
            batch.add(&self.lock("persist: edge rows").graph, &[], chunk);
        }
        let rows = batch.len();
        let written = anomos_net::rt::spawn_blocking(move || {
            let r = store.write(&batch);
            (r, batch)
        })
        .await;
        match written {
            Ok((Ok(()), _)) => Ok(rows),
            Ok((Err(e), batch)) => {
                self.lock("persist: failed write").graph.mark_changed(batch.dirty());
                Err(e)
            }
            Err(e) => {
                Err(TrackerError::Store { path: self.args.db_path().display().to_string(), message: e.to_string() })
            }
        }
    }
}
