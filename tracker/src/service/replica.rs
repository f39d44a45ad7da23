//! The service's side of replicas (`crate::replica`): staging what a request changed, committing it before the
//! reply, reading back and retrying after a conflict, and applying what other instances changed.

use super::*;
use crate::replica::{self, Change, CommitError, Revisions, Shared, Staged};
use anomos_proto::ids::NeighborId;

/// Attempts of one request's transaction before it is refused with `Unavailable` (each after a conflict, reading
/// the keys back first).
pub(crate) const COMMIT_ATTEMPTS: u32 = 10;

/// Why a commit did not happen, for the request that made it.
pub(super) enum Retry {
    /// Read back; run the request again.
    Again,
    /// Refuse the request: this instance cannot serve.
    Refuse(String),
}

impl Service {
    /// A replica's service over `graph` (loaded from etcd at the revisions `revs`).
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub(crate) fn replicated(
        args: TrackerArgs,
        graph: Graph<PublicKey>,
        revs: Revisions,
        shared: Arc<dyn Shared>,
    ) -> Service {
        let mut s = Service::with_graph(args, graph, None);
        s.state.lock("replica: start").revs = revs;
        s.replica = Some(shared);
        s
    }

    /// The `Unavailable` reply while this replica must not serve (None: serve).
    pub(super) fn unavailable(&self) -> Option<FromTracker> {
        let why = self.replica.as_ref()?.available().err()?;
        self.metrics.refused.inc(Refusal::Unavailable);
        Some(error_reply(ErrorCode::Unavailable, format!("this tracker replica cannot serve now ({why}); try another")))
    }

    /// Under the state lock, right after a request changed the graph: its changes as a transaction (None when the
    /// state is not shared: the embedded store writes behind).
    pub(super) fn stage(&self, st: &mut State, announcing: Option<Fingerprint>) -> Option<Staged> {
        self.replica.as_ref()?;
        let dirty = st.graph.take_changes();
        Some(replica::stage(&st.graph, &st.revs, &dirty, announcing))
    }

    /// Commits `staged` (nothing without replicas). After a conflict the keys it touched are read back into the
    /// graph and `Retry::Again` says to run the request again.
    pub(super) async fn commit(&self, staged: Option<Staged>) -> Result<(), Retry> {
        let (Some(shared), Some(staged)) = (self.replica.as_ref(), staged) else { return Ok(()) };
        if staged.is_empty() {
            return Ok(());
        }
        match shared.commit(&staged).await {
            Ok(rev) => {
                replica::committed(&mut self.lock("replica: committed").revs, &staged, rev);
                Ok(())
            }
            // Another instance got there first, or the announcing peer's lease had ended: put the touched keys back
            // as etcd has them now (undoing this request's uncommitted changes, and taking in the other instance's
            // before the watch brings them, so that the next attempt does not conflict on them again), except those
            // held here at a later revision; then the request runs again.
            Err(CommitError::Conflict | CommitError::Expired(_)) => {
                match self.read_back(shared.as_ref(), &staged).await {
                    Ok(()) => Err(Retry::Again),
                    Err(e) => {
                        shared.lost(e.clone());
                        Err(Retry::Refuse(e))
                    }
                }
            }
            // etcd failed or was too slow: whatever happened to the transaction, the graph gets etcd's keys back
            // (the watch brings the transaction later if it did happen). Only when etcd cannot even be read is the
            // instance cut off until a whole resynchronization.
            Err(CommitError::Unavailable(e)) => {
                if let Err(again) = self.read_back(shared.as_ref(), &staged).await {
                    shared.lost(again);
                }
                Err(Retry::Refuse(e))
            }
        }
    }

    /// Reads the keys `staged` touches and puts them into the graph, except those held here at a later revision
    /// (the watch moved on meanwhile, or this instance committed them). The watch's older events for these keys,
    /// still on their way, may undo them for a moment; its later ones restore them.
    async fn read_back(&self, shared: &dyn Shared, staged: &Staged) -> Result<(), String> {
        let (peers, edges) = staged.keys();
        let truth = shared.read(&peers, &edges, 0).await?;
        let now = Instant::now();
        let mut st = self.lock("replica: read back");
        let State { graph, revs, .. } = &mut *st;
        for (fp, record) in truth.peers {
            if !revs.newer_than(replica::Key::Peer(fp), truth.revision) {
                revs.changed(replica::Key::Peer(fp), truth.revision);
                replica::apply_peer(graph, revs, fp, record, now);
            }
        }
        for (nid, record) in truth.edges {
            if !revs.newer_than(replica::Key::Edge(nid), truth.revision) {
                revs.changed(replica::Key::Edge(nid), truth.revision);
                replica::apply_edge(graph, revs, nid, record);
            }
        }
        graph.take_changes();
        Ok(())
    }

    /// A short random pause before attempt `n` of a conflicting request (instances racing for one peer's edges
    /// do not collide again in lock step).
    pub(super) async fn backoff(n: u32) {
        let ms = rand::Rng::gen_range(&mut rand::thread_rng(), 0..=2u64 << n.min(5));
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    /// Puts the watch's events (each with its revision) into the graph; returns the edges that went with removed
    /// peers (their keys are deleted from the shared state by the caller).
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub(crate) fn apply(&self, changes: Vec<(Change, i64)>) -> Vec<NeighborId> {
        let now = Instant::now();
        let mut orphans = Vec::new();
        let mut st = self.lock("replica: apply watched");
        let State { graph, revs, .. } = &mut *st;
        for (c, rev) in changes {
            revs.watched = revs.watched.max(rev);
            let key = match &c {
                Change::Peer(fp, _) => replica::Key::Peer(*fp),
                Change::Edge(nid, _) => replica::Key::Edge(*nid),
            };
            if revs.newer_than(key, rev) {
                continue; // already read back or committed here at a later revision
            }
            match c {
                Change::Peer(fp, record) => {
                    revs.changed(replica::Key::Peer(fp), rev);
                    orphans.extend(replica::apply_peer(graph, revs, fp, record, now));
                }
                Change::Edge(nid, record) => {
                    revs.changed(replica::Key::Edge(nid), rev);
                    replica::apply_edge(graph, revs, nid, record);
                }
            }
        }
        graph.take_changes();
        orphans
    }

    /// Replaces the graph with one loaded whole from the shared state (at start, and after the watch was lost).
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub(crate) fn replace_graph(&self, mut graph: Graph<PublicKey>, revs: Revisions) {
        graph.presize();
        let mut st = self.lock("replica: replace graph");
        st.graph = graph;
        st.revs = revs;
    }

    /// Marks `culprit` avoided for everyone and shares the mark (with replicas: committed in the background,
    /// retried after conflicts). Returns whether it was newly avoided here.
    pub(super) fn avoid_shared(self: &Arc<Self>, st: &mut State, culprit: Fingerprint) -> bool {
        let newly = st.graph.avoid(&culprit);
        let Some(staged) = self.stage(st, None) else { return newly };
        let service = Arc::clone(self);
        tokio::spawn(async move {
            let mut staged = Some(staged);
            for n in 0..COMMIT_ATTEMPTS {
                match service.commit(staged.take()).await {
                    Ok(()) => return,
                    Err(Retry::Refuse(e)) => {
                        warn!(peer = %culprit.short(), error = %e, "avoiding a peer: not shared (the replica is cut off)");
                        return;
                    }
                    Err(Retry::Again) => {
                        Self::backoff(n).await;
                        let mut st = service.lock("replica: avoid");
                        st.graph.avoid(&culprit);
                        staged = service.stage(&mut st, None);
                    }
                }
            }
            warn!(peer = %culprit.short(), "avoiding a peer: not shared (kept conflicting)");
        });
        newly
    }
}
