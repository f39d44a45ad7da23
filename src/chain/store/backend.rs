//! Where the chain store keeps what must survive a restart: the [`ChainBackend`] trait, the in-memory
//! backend, and the best-chain update they persist atomically with headers.

use std::collections::HashMap;

use bitcoin::{BlockHash, Txid};

use super::{ChainError, HeaderEntry, PoolTx};

/// A change of the best-chain index: heights `from..from + hashes.len()` now hold `hashes`;
/// heights from `from + hashes.len()` up to `old_len - 1` are no longer on it.
#[derive(Debug, Clone, Copy)]
pub struct BestChainUpdate<'a> {
    /// First height rewritten.
    pub from: u32,
    /// The new hashes from `from` up.
    pub hashes: &'a [BlockHash],
    /// Length of the best chain before (tip height + 1).
    pub old_len: u32,
}

/// Where headers, block bodies and pool transactions are kept.
///
/// Implementations store what they are given and hand it back; they do not validate. Each
/// `put_*`/`remove_*` call is atomic: after a crash either all of it is there or none. Errors
/// are I/O or corruption ([`ChainError::Store`]).
pub trait ChainBackend: Send + Sync {
    /// Persists header entries (already indexed by the store; parents before children) and,
    /// atomically with them, the change they made to the best chain.
    fn put_headers(&mut self, entries: &[HeaderEntry], best: Option<BestChainUpdate<'_>>) -> Result<(), ChainError>;
    /// All persisted header entries, parents before children (e.g. by height).
    fn load_headers(&self) -> Result<Vec<HeaderEntry>, ChainError>;
    /// The persisted best-chain index as (height, hash), by height.
    fn load_best_chain(&self) -> Result<Vec<(u32, BlockHash)>, ChainError>;
    /// Persists a block body (consensus serialization, witness included).
    fn put_block(&mut self, hash: &BlockHash, raw: &[u8]) -> Result<(), ChainError>;
    /// Persists several block bodies in one atomic write (each is whole or absent after a crash).
    fn put_blocks(&mut self, blocks: &[(BlockHash, Vec<u8>)]) -> Result<(), ChainError> {
        blocks.iter().try_for_each(|(h, raw)| self.put_block(h, raw))
    }
    /// With `false`, writes stay atomic but need not be durable until [`flush`](Self::flush)
    /// (bulk loads). Backends without the distinction ignore it.
    fn set_durable(&mut self, _durable: bool) {}
    /// Makes all earlier writes durable.
    fn flush(&mut self) -> Result<(), ChainError> {
        Ok(())
    }
    /// A stored block body.
    fn block_bytes(&self, hash: &BlockHash) -> Result<Option<Vec<u8>>, ChainError>;
    /// Hashes of all stored block bodies.
    fn block_hashes(&self) -> Result<Vec<BlockHash>, ChainError>;
    /// Persists a pool transaction.
    fn put_tx(&mut self, tx: &PoolTx) -> Result<(), ChainError>;
    /// Removes pool transactions (unknown ones are ignored).
    fn remove_txs(&mut self, txids: &[Txid]) -> Result<(), ChainError>;
    /// All persisted pool transactions.
    fn load_txs(&self) -> Result<Vec<PoolTx>, ChainError>;
}

/// A backend that keeps everything in memory (tests, short-lived nodes).
#[derive(Debug, Default)]
pub struct MemoryBackend {
    headers: Vec<HeaderEntry>,
    best: std::collections::BTreeMap<u32, BlockHash>,
    blocks: HashMap<BlockHash, Vec<u8>>,
    txs: HashMap<Txid, PoolTx>,
}

impl ChainBackend for MemoryBackend {
    fn put_headers(&mut self, entries: &[HeaderEntry], best: Option<BestChainUpdate<'_>>) -> Result<(), ChainError> {
        self.headers.extend_from_slice(entries);
        if let Some(b) = best {
            apply_best_update(&mut self.best, b);
        }
        Ok(())
    }
    fn load_headers(&self) -> Result<Vec<HeaderEntry>, ChainError> {
        Ok(self.headers.clone())
    }
    fn load_best_chain(&self) -> Result<Vec<(u32, BlockHash)>, ChainError> {
        Ok(self.best.iter().map(|(h, b)| (*h, *b)).collect())
    }
    fn put_block(&mut self, hash: &BlockHash, raw: &[u8]) -> Result<(), ChainError> {
        self.blocks.insert(*hash, raw.to_vec());
        Ok(())
    }
    fn block_bytes(&self, hash: &BlockHash) -> Result<Option<Vec<u8>>, ChainError> {
        Ok(self.blocks.get(hash).cloned())
    }
    fn block_hashes(&self) -> Result<Vec<BlockHash>, ChainError> {
        Ok(self.blocks.keys().copied().collect())
    }
    fn put_tx(&mut self, tx: &PoolTx) -> Result<(), ChainError> {
        self.txs.insert(tx.txid, tx.clone());
        Ok(())
    }
    fn remove_txs(&mut self, txids: &[Txid]) -> Result<(), ChainError> {
        for t in txids {
            self.txs.remove(t);
        }
        Ok(())
    }
    fn load_txs(&self) -> Result<Vec<PoolTx>, ChainError> {
        Ok(self.txs.values().cloned().collect())
    }
}

/// Applies a best-chain change to a height → hash map.
pub fn apply_best_update(map: &mut std::collections::BTreeMap<u32, BlockHash>, b: BestChainUpdate<'_>) {
    let mut h = b.from;
    for hash in b.hashes {
        map.insert(h, *hash);
        h = h.saturating_add(1);
    }
    while h < b.old_len {
        map.remove(&h);
        h += 1;
    }
}
