//! # The chain layer: Bitcoin blocks over circuits
//!
//! A serving peer answers Bitcoin P2P requests (headers, blocks) that arrive over circuits ending
//! at it; a requesting peer syncs its copy of the chain over circuits it opened. Every circuit
//! message is exactly one Bitcoin envelope (24-byte header + payload, the network's magic).
//!
//! * [`store`]: [`ChainStore`], the header tree (cumulative work, best chain, locators,
//!   `getheaders` answers), block bodies and the transaction pool behind a small
//!   [`store::ChainBackend`] trait: [`MemoryBackend`] for tests, [`db::RedbBackend`] (a redb
//!   file in the data directory, crash-safe) for peers.
//! * [`validate`]: the contextual checks that need the store (difficulty, median time past,
//!   future timestamps, header versions, BIP 34 heights), on top of the context-free ones in
//!   [`anomos_proto::btc::validate`].
//! * [`wire`]: [`wire::BtcPeer`], one Bitcoin conversation over one [`CircuitStream`]
//!   (framing, byte counts, timeouts) and our anonymous `version` message.
//! * [`serve`]: [`ChainService`], the [`crate::node::Service`] that answers requesters and
//!   announces new blocks and transactions.
//! * [`sync`](mod@sync): the requester side: handshake, headers-first, blocks in parallel over
//!   several circuits with stall detection and replacement, live following.
//! * [`mine`]: regtest block production for tests and local networks.
//!
//! Anonymity: we never tell a peer an address. Our `version` carries the unspecified address
//! `[::]:0` with no service bits for both ends, `getaddr` is answered with an empty `addr`, and
//! the user agent is the same for every anomos peer.
//!
//! [`CircuitStream`]: crate::CircuitStream

pub mod db;
pub mod mine;
pub mod serve;
pub mod store;
pub mod sync;
pub mod validate;
pub mod wire;

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use anomos_proto::btc::BtcError;
use anomos_proto::cell::BreakReason;
use bitcoin::BlockHash;
use thiserror::Error;

use crate::error::PeerError;

pub use db::{open_store, store_path, RedbBackend};
pub use mine::{mine_block, mine_on, mine_regtest};
pub use serve::{serve_stream, Announcement, ChainService, Misbehave, POOL_SHARE_BYTES, TXS_PER_MINUTE, TX_BURST};
pub use store::{BestChainUpdate, ChainBackend, ChainStore, HeaderEntry, MemoryBackend, PoolTx};
pub use sync::{run_sync, sync, sync_with, CircuitSource, SyncEvent, SyncOptions, SyncPhase, SyncProgress, SyncReport};

/// Most headers in one `headers` message (Bitcoin Core's `MAX_HEADERS_RESULTS`).
pub const MAX_HEADERS: usize = 2000;

/// Most hashes we accept in a block locator (Bitcoin Core's `MAX_LOCATOR_SZ`).
pub const MAX_LOCATOR: usize = 101;

/// Most items we accept in one `getdata` (Bitcoin Core's `MAX_INV_SZ`).
pub const MAX_INV: usize = 50_000;

/// A store shared by the service (readers) and sync (writer). Locks are held only briefly and
/// never across an `.await`.
pub type SharedStore = Arc<RwLock<ChainStore>>;

/// Wraps a store for sharing.
pub fn shared(store: ChainStore) -> SharedStore {
    Arc::new(RwLock::new(store))
}

/// Read access; a panic in another holder does not make the store unusable.
pub(crate) fn read(store: &SharedStore) -> RwLockReadGuard<'_, ChainStore> {
    store.read().unwrap_or_else(|e| e.into_inner())
}

/// Write access (see [`read`]).
pub(crate) fn write(store: &SharedStore) -> RwLockWriteGuard<'_, ChainStore> {
    store.write().unwrap_or_else(|e| e.into_inner())
}

/// Why a header or block is invalid.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Invalid {
    /// A context-free consensus check of the wire layer failed (PoW, linkage, merkle root, ...).
    #[error(transparent)]
    Consensus(#[from] BtcError),
    /// A rule that needs the chain failed (difficulty, timestamps, version, BIP 34, ...).
    #[error("{0}")]
    Context(String),
}

/// Errors of the chain layer.
///
/// [`ChainError::is_peer_fault`] tells whether the remote end misbehaved (the caller breaks the
/// circuit and reports it) or something else went wrong.
#[derive(Debug, Error)]
pub enum ChainError {
    /// A circuit message that is not exactly one valid envelope of our network, or whose
    /// payload does not decode.
    #[error("malformed message: {0}")]
    Malformed(BtcError),
    /// A well-formed message that breaks the conversation's rules.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// A header that breaks a consensus rule.
    #[error("invalid header {hash}: {reason}")]
    InvalidHeader {
        /// Its hash.
        hash: BlockHash,
        /// What is wrong (boxed: keeps the error small).
        reason: Box<Invalid>,
    },
    /// A block that breaks a consensus rule.
    #[error("invalid block {hash}: {reason}")]
    InvalidBlock {
        /// Its hash.
        hash: BlockHash,
        /// What is wrong (boxed: keeps the error small).
        reason: Box<Invalid>,
    },
    /// The peer answered a request for a block on its own best chain with `notfound`.
    #[error("peer does not have block {0}")]
    NotFound(BlockHash),
    /// The peer did not answer in time.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// The peer kept answering `ping` but not the requests named: it withholds them (a stall the network cannot
    /// explain, since a `pong` follows the requests before it on the circuit).
    #[error("withheld {0} while answering pings")]
    Withheld(&'static str),
    /// The circuit failed or closed.
    #[error("circuit: {0}")]
    Circuit(#[from] PeerError),
    /// A header whose parent we do not know.
    #[error("header {hash} builds on unknown header {prev}")]
    UnknownParent {
        /// The header.
        hash: BlockHash,
        /// Its `prev_blockhash`.
        prev: BlockHash,
    },
    /// The store's backend failed or is inconsistent.
    #[error("store: {0}")]
    Store(String),
    /// Wrong or unsuitable network parameters.
    #[error("network parameters: {0}")]
    Params(String),
}

impl ChainError {
    /// An invalid header's error.
    pub fn invalid_header(hash: BlockHash, reason: impl Into<Invalid>) -> ChainError {
        ChainError::InvalidHeader { hash, reason: Box::new(reason.into()) }
    }

    /// An invalid block's error.
    pub fn invalid_block(hash: BlockHash, reason: impl Into<Invalid>) -> ChainError {
        ChainError::InvalidBlock { hash, reason: Box::new(reason.into()) }
    }

    /// For an invalid header or block: its hash and what is wrong.
    pub fn invalid(&self) -> Option<(&BlockHash, &Invalid)> {
        match self {
            ChainError::InvalidHeader { hash, reason } | ChainError::InvalidBlock { hash, reason } => {
                Some((hash, reason))
            }
            _ => None,
        }
    }

    /// True if the remote end sent something it must not have (or nothing at all in time): everything
    /// [`break_reason`](Self::break_reason) breaks as `misbehaving` or `timeout`, and a `notfound` answer.
    pub fn is_peer_fault(&self) -> bool {
        matches!(self.break_reason(), BreakReason::Misbehaving | BreakReason::Timeout)
            || matches!(self, ChainError::NotFound(_))
    }

    /// How a circuit that failed with this error is broken: `misbehaving` for what the remote end sent (so the
    /// other side can tell refusal from a clean close, and a requester reports its target), `timeout` for
    /// silence, `finished` for everything on our side.
    pub fn break_reason(&self) -> BreakReason {
        match self {
            ChainError::Malformed(_)
            | ChainError::Protocol(_)
            | ChainError::InvalidHeader { .. }
            | ChainError::InvalidBlock { .. }
            | ChainError::Withheld(_) => BreakReason::Misbehaving,
            ChainError::Timeout(_) => BreakReason::Timeout,
            _ => BreakReason::Finished,
        }
    }
}

impl From<ChainError> for PeerError {
    fn from(e: ChainError) -> Self {
        match e {
            ChainError::Circuit(p) => p,
            other => PeerError::Chain(other.to_string()),
        }
    }
}
