//! The requesting side: bring a store up to serving peers' best chain over several circuits,
//! replace circuits that misbehave or stall, and (optionally) keep following new blocks.
//!
//! [`run_sync`] drives one engine task; every circuit has a reader task (decodes each message
//! and runs the context-free block checks, so those run in parallel) and a writer task (sends
//! in order without ever blocking the engine). Per circuit:
//!
//! 1. **Handshake**: our anonymous `version` (see [`super::wire`]), their `version` answered
//!    with `verack`, then `sendheaders` when following.
//! 2. **Headers first**: `getheaders` with our locator, repeated from the last received header
//!    while replies are full (2000). Every circuit does this, so a liar is caught whichever it
//!    is. Each new header is checked before it is stored: linkage, proof of work against nBits
//!    and the network's limit, difficulty (retargets), timestamps (after the median of the
//!    previous 11, at most 2 hours ahead of our clock) and version; a batch is stored with the
//!    best-chain change it causes in one atomic write. A chain with more work wins (reorg).
//!    A custom network's store learns its genesis header first (`getheaders` with an empty
//!    locator and the genesis hash as stop).
//! 3. **Blocks**: best-chain blocks we lack, oldest first, are spread over the ready circuits,
//!    at most `window` outstanding per circuit (`getdata`). A block must be one we asked that
//!    circuit for; it is checked (merkle root, no duplicate txs, size/weight, coinbase, witness
//!    commitment, BIP 34) and stored; blocks arriving while a commit runs are committed
//!    together in the next. A block we know but did not ask that circuit for is a wrong
//!    answer (misbehaving); a block we do not know, not asked for, is ignored (unsolicited) and
//!    is not progress. `notfound` moves the block to other circuits; a circuit that refused 8, or
//!    has nothing left to do while a block it refused is fetched by no one, is dropped (finished,
//!    not blamed) for a fresh one. A full `headers` answer that adds nothing and ends no higher
//!    than where we asked from (the same answer again) is misbehaving.
//!
//! A circuit that sends something invalid, or **withholds** (requested blocks stall while it answers
//! the `ping` sent halfway through the stall), is broken with [`BreakReason::Misbehaving`] (which
//! also reports its target to the tracker); one that **stalls** (requests outstanding and no
//! requested block for `stall_timeout`), or does not finish its handshake or answer
//! `getheaders` in time (from the oldest unanswered one: asking again does not restart the
//! clock), is broken with [`BreakReason::Timeout`]. Its outstanding requests go to the other
//! circuits, and a [`CircuitSource`], if given, is asked for a fresh circuit to replace it.
//!
//! Without `follow`, the sync ends once every ready circuit's headers ran out (a reply below
//! 2000) with no `getheaders` outstanding, every best-chain block is stored, and no circuit is
//! still shaking hands (one that is stops holding up the end 3 s after the first circuit's
//! headers ran out): one liar's quick empty answer does not end it at a stale tip. With `follow`, it then
//! reports [`SyncEvent::Synced`] and goes on: announced headers (`sendheaders`) and `inv`s of
//! blocks lead to `getheaders`/`getdata`; each new stored best tip is a [`SyncEvent::NewTip`],
//! each announced transaction a [`SyncEvent::Tx`].

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::time::Instant;

use anomos_proto::btc::{Message, NetParams};
use anomos_proto::btc::{ServiceFlags, VersionMessage};
use bitcoin::{BlockHash, Txid};
use tracing::debug;

use super::wire::{version_message, BtcPeer, MIN_PEER_VERSION};
use super::{read, ChainError, SharedStore};
use crate::circuit::CircuitStream;
use crate::error::PeerError;

mod engine;

/// Tuning of a sync.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// Blocks requested and not yet received, per circuit.
    pub window: usize,
    /// Time for the whole version/verack exchange.
    pub handshake_timeout: Duration,
    /// Longest wait for a `headers` answer.
    pub request_timeout: Duration,
    /// A circuit with blocks outstanding that delivers none for this long has stalled.
    pub stall_timeout: Duration,
    /// Keep the circuits open after the initial sync and follow new blocks.
    pub follow: bool,
    /// Circuits to keep open when a [`CircuitSource`] can replace them (0: as many as given).
    pub circuits: usize,
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions {
            window: 16,
            handshake_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(60),
            stall_timeout: Duration::from_secs(10),
            follow: false,
            circuits: 0,
        }
    }
}

/// A future yielding fresh circuits.
pub type CircuitFuture = Pin<Box<dyn Future<Output = Vec<CircuitStream>> + Send>>;

/// Asked for `n` fresh circuits to serving peers whenever circuits are lost; may yield fewer
/// (or none: asked again later, with backoff).
pub type CircuitSource = Box<dyn FnMut(usize) -> CircuitFuture + Send>;

/// Which part of the sync is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPhase {
    /// Fetching and validating headers.
    Headers,
    /// Fetching and validating blocks.
    Blocks,
}

/// Reported after each `headers` reply and each stored batch of blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncProgress {
    /// What is running.
    pub phase: SyncPhase,
    /// Height of our best header.
    pub header_height: u32,
    /// Blocks stored so far in this sync.
    pub blocks_done: u64,
    /// Blocks this sync has to fetch as far as known now (done + missing).
    pub blocks_total: u64,
    /// Bytes received so far, envelopes included.
    pub bytes: u64,
}

/// What happens during a sync, as it happens.
#[derive(Debug)]
pub enum SyncEvent {
    /// Progress.
    Progress(SyncProgress),
    /// A circuit was broken (it misbehaved, stalled, or closed) and dropped.
    CircuitFailed {
        /// Its index (the circuits given are 0.., replacements numbered on).
        circuit: usize,
        /// What went wrong.
        error: String,
        /// Whether it was broken as misbehaving (and its target reported).
        misbehaving: bool,
    },
    /// A replacement circuit joined.
    CircuitAdded {
        /// Its index.
        circuit: usize,
        /// Its onion layers.
        hops: usize,
    },
    /// The initial sync is complete (follow mode goes on).
    Synced {
        /// Best height.
        height: u32,
        /// Best tip.
        tip: BlockHash,
        /// Blocks stored so far.
        blocks: u64,
    },
    /// Follow mode: a new best block is stored.
    NewTip {
        /// Its height.
        height: u32,
        /// Its hash.
        hash: BlockHash,
    },
    /// Follow mode: a serving peer announced a transaction.
    Tx(Txid),
}

/// What a sync did.
#[derive(Debug)]
pub struct SyncReport {
    /// New headers stored.
    pub headers: u64,
    /// Blocks downloaded and stored.
    pub blocks: u64,
    /// Blocks requested (`getdata` items) over all circuits.
    pub requested: u64,
    /// Blocks received that were already stored or being stored (should be 0).
    pub refetched: u64,
    /// Bytes received over all circuits, envelopes included.
    pub bytes: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Our best tip afterwards.
    pub tip: BlockHash,
    /// Its height.
    pub height: u32,
    /// Circuits (by index) that failed; they were broken (misbehaving ones reported).
    pub peer_errors: Vec<(usize, ChainError)>,
    /// Replacement circuits that joined.
    pub replaced: usize,
}

/// Syncs `store` from the peer at the other end of `stream`, with default options.
pub async fn sync(
    stream: CircuitStream,
    params: &NetParams,
    store: &SharedStore,
    progress: impl FnMut(SyncProgress),
) -> Result<SyncReport, ChainError> {
    sync_with(vec![stream], params, store, &SyncOptions::default(), progress).await
}

/// Syncs `store` over several circuits to serving peers (no replacements, no following).
///
/// Fails if every circuit failed before the work was done (with the first circuit's error).
/// Circuits that failed while others completed the work are listed in
/// [`SyncReport::peer_errors`].
pub async fn sync_with(
    streams: Vec<CircuitStream>,
    params: &NetParams,
    store: &SharedStore,
    opts: &SyncOptions,
    mut progress: impl FnMut(SyncProgress),
) -> Result<SyncReport, ChainError> {
    let opts = SyncOptions { follow: false, ..opts.clone() };
    run_sync(streams, params, store, &opts, None, |e| {
        if let SyncEvent::Progress(p) = e {
            progress(p)
        }
    })
    .await
}

/// Runs a sync (see the module documentation). Without `opts.follow` it returns once synced;
/// with it, only on a store failure or when no circuit is left and none can be had.
pub async fn run_sync(
    streams: Vec<CircuitStream>,
    params: &NetParams,
    store: &SharedStore,
    opts: &SyncOptions,
    source: Option<CircuitSource>,
    on_event: impl FnMut(SyncEvent),
) -> Result<SyncReport, ChainError> {
    {
        let s = read(store);
        if s.params().magic != params.magic || s.params().genesis_hash != params.genesis_hash {
            return Err(ChainError::Params(format!(
                "store is for {}, sync asked for {}",
                s.params().name,
                params.name
            )));
        }
    }
    if streams.is_empty() && source.is_none() {
        return Err(ChainError::Params("no circuits to sync over".into()));
    }
    engine::drive(streams, params, store, opts, source, on_event).await
}

/// Sends our `version` and waits for the peer's `version` (answered with `verack`) and
/// `verack`. Returns the peer's `version`. (For single-purpose conversations such as
/// `anomos send-tx`; [`run_sync`] shakes hands inside its engine.)
pub async fn handshake(
    peer: &mut BtcPeer,
    our_height: u32,
    relay: bool,
    limit: Duration,
) -> Result<VersionMessage, ChainError> {
    peer.send(&Message::Version(version_message(ServiceFlags::NONE, our_height, relay))).await?;
    let deadline = Instant::now() + limit;
    let (mut theirs, mut verack): (Option<VersionMessage>, bool) = (None, false);
    loop {
        if let (Some(v), true) = (&theirs, verack) {
            return Ok(v.clone());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match peer.recv_timeout(left, "the handshake").await? {
            Message::Version(v) if theirs.is_none() => {
                if v.version < MIN_PEER_VERSION {
                    return Err(ChainError::Protocol(format!("protocol version {} is too old", v.version)));
                }
                peer.send(&Message::Verack).await?;
                theirs = Some(v);
            }
            Message::Verack => verack = true,
            Message::Ping(n) => peer.send(&Message::Pong(n)).await?,
            other => debug!(command = other.command(), "ignored during handshake"),
        }
    }
}
