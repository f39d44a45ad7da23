//! The chain store: a header tree with cumulative work, the best chain, block bodies and the
//! transaction pool.
//!
//! [`ChainStore`] keeps every known header in memory (about 150 bytes each, as Bitcoin Core's
//! block index does) together with its height, the chain's cumulative [`Work`] up to it and
//! whether its body is stored. The best chain is the one with the most work (the first seen
//! wins ties) and is kept as a height-indexed vector, so "hash at height" and "is on the best
//! chain" are O(1); a header with more work than the tip re-points the vector (reorg).
//!
//! What must survive a restart goes through a [`ChainBackend`]: header entries (with height and
//! cumulative work) together with the change they make to the best-chain index, in one atomic
//! write per batch; each block body in its own atomic write; pool transactions. [`MemoryBackend`]
//! keeps them in memory; [`super::db::RedbBackend`] in a redb file. [`ChainStore::open`] rebuilds
//! the index from whatever the backend holds.
//!
//! The store checks structure only (a header's parent must be known). Consensus checks are the
//! caller's job (see [`super::validate`]), before inserting.
//!
//! A store for a custom network whose genesis block we do not have starts *unrooted*: its
//! first inserted header must be the genesis header (hash = `params.genesis_hash`), which
//! becomes height 0; sync asks a peer for it (see [`ChainStore::is_rooted`]).

use std::collections::{HashMap, HashSet};

use anomos_proto::btc::NetParams;
use bitcoin::block::Header;
use bitcoin::hashes::Hash;
use bitcoin::{Block, BlockHash, OutPoint, Transaction, Txid, Work};

use super::ChainError;

mod backend;
mod cursor;
mod pool;

pub use backend::{apply_best_update, BestChainUpdate, ChainBackend, MemoryBackend};
pub use cursor::BranchCursor;
pub use pool::{PoolReject, PoolTx, MAX_POOL_BYTES, POOL_EXPIRY_SECS, RECENT_BYTES, RECENT_TXS};

/// What the store knows about one header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderEntry {
    /// The header.
    pub header: Header,
    /// Its height (genesis = 0).
    pub height: u32,
    /// Work of the chain from genesis up to and including this header.
    pub chain_work: Work,
    /// Whether its block body is stored.
    pub has_block: bool,
}

/// Headers, the best chain and block bodies of one network.
pub struct ChainStore {
    params: NetParams,
    index: HashMap<BlockHash, HeaderEntry>,
    /// The best chain: `active[h]` is the hash at height `h`.
    active: Vec<BlockHash>,
    blocks: usize,
    backend: Box<dyn ChainBackend>,
    pool: HashMap<Txid, PoolTx>,
    /// Outpoints spent by pool transactions.
    pool_spent: HashMap<OutPoint, Txid>,
    /// Pool transactions in arrival order (for mining and `mempool` answers).
    pool_order: Vec<Txid>,
    pool_bytes: usize,
    /// Pool transactions a block confirmed lately (in memory only), still answered to `getdata`.
    recent: pool::Recent,
}

impl std::fmt::Debug for ChainStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (tip, height) = self.best_tip();
        f.debug_struct("ChainStore")
            .field("network", &self.params.name)
            .field("headers", &self.index.len())
            .field("blocks", &self.blocks)
            .field("tip", &tip)
            .field("height", &height)
            .field("pool", &self.pool.len())
            .finish()
    }
}

impl ChainStore {
    /// An in-memory store holding only the genesis block of a known network.
    pub fn new(params: NetParams) -> Result<ChainStore, ChainError> {
        Self::open(params, Box::new(MemoryBackend::default()))
    }

    /// Opens a store over `backend`, reloading whatever it holds. Known networks start from
    /// their genesis block; custom networks from the genesis header stored in `backend`, or
    /// unrooted until it is inserted (see [`ChainStore::is_rooted`]).
    pub fn open(params: NetParams, backend: Box<dyn ChainBackend>) -> Result<ChainStore, ChainError> {
        match params.genesis_block() {
            Some(genesis) => Self::open_with_genesis(params, genesis, backend),
            None => Self::load(params, None, backend),
        }
    }

    /// Opens a store over `backend` with an explicit genesis block (custom networks).
    pub fn open_with_genesis(
        params: NetParams,
        genesis: Block,
        backend: Box<dyn ChainBackend>,
    ) -> Result<ChainStore, ChainError> {
        let hash = genesis.block_hash();
        if hash != params.genesis_hash {
            return Err(ChainError::Params(format!(
                "genesis block {hash} is not {}'s genesis {}",
                params.name, params.genesis_hash
            )));
        }
        Self::load(params, Some(genesis), backend)
    }

    fn load(
        params: NetParams,
        genesis: Option<Block>,
        backend: Box<dyn ChainBackend>,
    ) -> Result<ChainStore, ChainError> {
        let mut store = ChainStore {
            params,
            index: HashMap::new(),
            active: Vec::new(),
            blocks: 0,
            backend,
            pool: HashMap::new(),
            pool_spent: HashMap::new(),
            pool_order: Vec::new(),
            pool_bytes: 0,
            recent: pool::Recent::default(),
        };
        if let Some(g) = &genesis {
            store.index_header(g.header)?;
        }
        for entry in store.backend.load_headers()? {
            if !store.index.contains_key(&entry.header.block_hash()) {
                store.index_header(entry.header)?;
            }
        }
        // Ties in work: the persisted best chain (first seen) wins over the rebuilt one.
        if let Some((_, stored_tip)) = store.backend.load_best_chain()?.last().copied() {
            if let Some(e) = store.index.get(&stored_tip) {
                if e.chain_work >= store.tip_work() && store.best_tip().0 != stored_tip {
                    store.set_tip(stored_tip)?;
                }
            }
        }
        for hash in store.backend.block_hashes()? {
            if let Some(e) = store.index.get_mut(&hash) {
                if !e.has_block {
                    e.has_block = true;
                    store.blocks += 1;
                }
            }
        }
        if let Some(g) = &genesis {
            if !store.has_block(&g.block_hash()) {
                store.insert_block(g)?;
            }
        }
        let mut txs = store.backend.load_txs()?;
        txs.sort_by_key(|t| t.added);
        for t in txs {
            if let Ok(tx) = bitcoin::consensus::deserialize::<Transaction>(&t.raw) {
                store.pool_index(&tx, t);
            }
        }
        Ok(store)
    }

    /// The network this store is for.
    pub fn params(&self) -> &NetParams {
        &self.params
    }

    /// False for a custom-network store that does not know its genesis header yet: the first
    /// header inserted must be it.
    pub fn is_rooted(&self) -> bool {
        !self.active.is_empty()
    }

    /// Adds a header whose parent is known. Returns false if it was already known.
    pub fn insert_header(&mut self, header: Header) -> Result<bool, ChainError> {
        Ok(self.insert_headers(&[header])? == 1)
    }

    /// Adds headers in order (each one's parent must be known by the time it comes). Returns how
    /// many were new. On error, the headers before the failing one stay inserted. The new
    /// headers and the best-chain change they cause are persisted in one atomic write.
    pub fn insert_headers(&mut self, headers: &[Header]) -> Result<usize, ChainError> {
        self.insert_headers_checked(headers, |_, _| Ok(()))
    }

    /// [`insert_headers`](Self::insert_headers), calling `check` on each new header (with the
    /// store as it is after the headers before it) before indexing it; stops at the first
    /// error, keeping (and persisting, in one write) the headers before it.
    pub fn insert_headers_checked(
        &mut self,
        headers: &[Header],
        mut check: impl FnMut(&ChainStore, &Header) -> Result<(), ChainError>,
    ) -> Result<usize, ChainError> {
        let old_len = self.active.len();
        let mut fork: Option<usize> = None;
        let mut added = Vec::new();
        let mut result = Ok(());
        for header in headers {
            let hash = header.block_hash();
            if self.index.contains_key(&hash) {
                continue;
            }
            if let Err(e) = check(self, header) {
                result = Err(e);
                break;
            }
            match self.index_header(*header) {
                Ok(f) => {
                    if let Some(f) = f {
                        fork = Some(fork.map_or(f, |x| x.min(f)));
                    }
                    if let Some(e) = self.index.get(&hash) {
                        added.push(*e);
                    }
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if !added.is_empty() {
            let best = fork.map(|from| BestChainUpdate {
                from: u32::try_from(from).unwrap_or(u32::MAX),
                hashes: self.active.get(from..).unwrap_or_default(),
                old_len: u32::try_from(old_len).unwrap_or(u32::MAX),
            });
            self.backend.put_headers(&added, best)?;
        }
        result.map(|()| added.len())
    }

    /// Stores a block body, adding its header first if needed (its parent must be known).
    /// Returns false if the body was already stored. Nothing is validated here. A block on the
    /// best chain takes its transactions out of the pool.
    pub fn insert_block(&mut self, block: &Block) -> Result<bool, ChainError> {
        let hash = block.block_hash();
        if !self.index.contains_key(&hash) {
            self.insert_header(block.header)?;
        }
        if self.has_block(&hash) {
            return Ok(false);
        }
        let raw = bitcoin::consensus::serialize(block);
        self.backend.put_block(&hash, &raw)?;
        if let Some(e) = self.index.get_mut(&hash) {
            e.has_block = true;
            self.blocks += 1;
        }
        if !self.pool.is_empty() && self.is_active(&hash) {
            self.remove_confirmed(block)?;
        }
        Ok(true)
    }

    /// Stores several block bodies whose headers are known, in one atomic write. Returns how
    /// many were new.
    pub fn insert_blocks(&mut self, blocks: &[Block]) -> Result<usize, ChainError> {
        let mut raws = Vec::with_capacity(blocks.len());
        for b in blocks {
            let hash = b.block_hash();
            if !self.index.contains_key(&hash) {
                return Err(ChainError::Store(format!("block {hash} has no header")));
            }
            if !self.has_block(&hash) && !raws.iter().any(|(h, _)| *h == hash) {
                raws.push((hash, bitcoin::consensus::serialize(b)));
            }
        }
        if raws.is_empty() {
            return Ok(0);
        }
        self.backend.put_blocks(&raws)?;
        for (hash, _) in &raws {
            if let Some(e) = self.index.get_mut(hash) {
                e.has_block = true;
                self.blocks += 1;
            }
        }
        if !self.pool.is_empty() {
            for b in blocks {
                if self.is_active(&b.block_hash()) {
                    self.remove_confirmed(b)?;
                }
            }
        }
        Ok(raws.len())
    }

    /// See [`ChainBackend::set_durable`].
    pub fn set_durable(&mut self, durable: bool) {
        self.backend.set_durable(durable);
    }

    /// See [`ChainBackend::flush`].
    pub fn flush(&mut self) -> Result<(), ChainError> {
        self.backend.flush()
    }

    /// Whether the body of `hash` is stored.
    pub fn has_block(&self, hash: &BlockHash) -> bool {
        self.index.get(hash).is_some_and(|e| e.has_block)
    }

    /// The raw (consensus-serialized, witness included) body of `hash`, if stored.
    pub fn block_bytes(&self, hash: &BlockHash) -> Result<Option<Vec<u8>>, ChainError> {
        if !self.has_block(hash) {
            return Ok(None);
        }
        self.backend.block_bytes(hash)
    }

    /// The body of `hash`, if stored.
    pub fn block(&self, hash: &BlockHash) -> Result<Option<Block>, ChainError> {
        match self.block_bytes(hash)? {
            None => Ok(None),
            Some(raw) => bitcoin::consensus::deserialize(&raw)
                .map(Some)
                .map_err(|e| ChainError::Store(format!("stored block {hash} does not decode: {e}"))),
        }
    }

    /// A known header.
    pub fn header(&self, hash: &BlockHash) -> Option<Header> {
        self.index.get(hash).map(|e| e.header)
    }

    /// Everything known about a header.
    pub fn entry(&self, hash: &BlockHash) -> Option<&HeaderEntry> {
        self.index.get(hash)
    }

    /// Height of a known header (on any branch).
    pub fn height_of(&self, hash: &BlockHash) -> Option<u32> {
        self.index.get(hash).map(|e| e.height)
    }

    /// The tip of the best (most-work) header chain and its height.
    pub fn best_tip(&self) -> (BlockHash, u32) {
        let hash = self.active.last().copied().unwrap_or(self.params.genesis_hash);
        (hash, self.tip_height())
    }

    /// Cumulative work of the best chain.
    pub fn tip_work(&self) -> Work {
        let (tip, _) = self.best_tip();
        self.index.get(&tip).map_or(Work::from_be_bytes([0; 32]), |e| e.chain_work)
    }

    fn tip_height(&self) -> u32 {
        u32::try_from(self.active.len().saturating_sub(1)).unwrap_or(u32::MAX)
    }

    /// The best chain's hash at `height`.
    pub fn hash_at(&self, height: u32) -> Option<BlockHash> {
        self.active.get(height as usize).copied()
    }

    /// Whether `hash` is on the best chain.
    pub fn is_active(&self, hash: &BlockHash) -> bool {
        self.index.get(hash).is_some_and(|e| self.active.get(e.height as usize) == Some(hash))
    }

    /// Number of known headers (genesis included).
    pub fn header_count(&self) -> usize {
        self.index.len()
    }

    /// Number of stored block bodies (genesis included).
    pub fn block_count(&self) -> usize {
        self.blocks
    }

    /// The ancestor of `hash` at `height` (`hash` itself at its own height).
    pub fn ancestor(&self, hash: &BlockHash, height: u32) -> Option<BlockHash> {
        let mut cur = *hash;
        loop {
            let e = self.index.get(&cur)?;
            if height > e.height {
                return None;
            }
            if height == e.height {
                return Some(cur);
            }
            if self.active.get(e.height as usize) == Some(&cur) {
                return self.hash_at(height);
            }
            cur = e.header.prev_blockhash;
        }
    }

    /// Median of the timestamps of `hash` and its up to 10 predecessors (BIP 113 "median time
    /// past"); a new child's time must be greater.
    pub fn median_time_past(&self, hash: &BlockHash) -> Option<u32> {
        let mut times = Vec::with_capacity(super::validate::MEDIAN_TIME_SPAN);
        let mut cur = self.index.get(hash)?;
        loop {
            times.push(cur.header.time);
            if times.len() == super::validate::MEDIAN_TIME_SPAN || cur.height == 0 {
                break;
            }
            match self.index.get(&cur.header.prev_blockhash) {
                Some(parent) => cur = parent,
                None => break,
            }
        }
        times.sort_unstable();
        times.get(times.len() / 2).copied()
    }

    /// A block locator for the best chain: the tip and 10 predecessors, then exponentially
    /// sparser, ending at genesis (Bitcoin Core's `LocatorEntries`).
    pub fn locator(&self) -> Vec<BlockHash> {
        let (tip, _) = self.best_tip();
        self.locator_from(&tip)
    }

    /// A block locator starting at any known header (empty if it is unknown).
    pub fn locator_from(&self, hash: &BlockHash) -> Vec<BlockHash> {
        let mut have = Vec::with_capacity(32);
        let Some(mut height) = self.height_of(hash) else { return have };
        let mut cur = *hash;
        let mut step = 1u32;
        loop {
            have.push(cur);
            if height == 0 {
                break;
            }
            height = height.saturating_sub(step);
            match self.ancestor(&cur, height) {
                Some(a) => cur = a,
                None => break,
            }
            if have.len() > 10 {
                step = step.saturating_mul(2);
            }
        }
        have
    }

    /// Answers `getheaders` as Bitcoin Core does: starting after the first locator hash on our
    /// best chain (or after genesis if none is), up to `max` headers of the best chain, ending
    /// early with `stop` if it comes. An empty locator asks for the `stop` header alone.
    pub fn headers_after(&self, locator: &[BlockHash], stop: &BlockHash, max: usize) -> Vec<Header> {
        self.headers_after_inner(locator, stop, max, false)
    }

    /// [`headers_after`](Self::headers_after), ending before the first block we do not store: what a serving
    /// peer may claim (a requester takes `notfound` for a block whose header it was sent as withholding).
    pub fn servable_headers_after(&self, locator: &[BlockHash], stop: &BlockHash, max: usize) -> Vec<Header> {
        self.headers_after_inner(locator, stop, max, true)
    }

    fn headers_after_inner(&self, locator: &[BlockHash], stop: &BlockHash, max: usize, stored: bool) -> Vec<Header> {
        if locator.is_empty() {
            return self.header(stop).into_iter().filter(|_| !stored || self.has_block(stop)).collect();
        }
        let start = self.fork_point(locator);
        let mut out = Vec::new();
        let mut height = start.saturating_add(1);
        while out.len() < max {
            let Some(hash) = self.hash_at(height) else { break };
            if stored && !self.has_block(&hash) {
                break;
            }
            let Some(header) = self.header(&hash) else { break };
            out.push(header);
            if hash == *stop {
                break;
            }
            height += 1;
        }
        out
    }

    /// Height of the last block we share with a locator (Core's `FindForkInGlobalIndex`).
    fn fork_point(&self, locator: &[BlockHash]) -> u32 {
        let (tip, tip_height) = self.best_tip();
        for hash in locator {
            let Some(e) = self.index.get(hash) else { continue };
            if self.is_active(hash) {
                return e.height;
            }
            if self.ancestor(hash, tip_height) == Some(tip) {
                return tip_height;
            }
        }
        0
    }

    /// Best-chain blocks (from `from_height` up) whose bodies are missing, oldest first, at most
    /// `limit`.
    pub fn missing_blocks(&self, from_height: u32, limit: usize) -> Vec<BlockHash> {
        self.missing_from(from_height).take(limit).map(|(_, h)| h).collect()
    }

    /// Best-chain blocks from `from_height` up whose bodies are missing, as (height, hash),
    /// oldest first.
    pub fn missing_from(&self, from_height: u32) -> impl Iterator<Item = (u32, BlockHash)> + '_ {
        self.active
            .iter()
            .enumerate()
            .skip(from_height as usize)
            .filter(|(_, h)| !self.has_block(h))
            .map(|(i, h)| (u32::try_from(i).unwrap_or(u32::MAX), *h))
    }

    /// Puts a header into the index (parent must be known; or, in an empty index, the network's
    /// genesis header) and moves the best chain if it now has the most work. Returns the first
    /// best-chain height that changed, if any.
    fn index_header(&mut self, header: Header) -> Result<Option<usize>, ChainError> {
        let hash = header.block_hash();
        let (height, chain_work) = if self.index.is_empty() {
            if hash != self.params.genesis_hash {
                return Err(ChainError::UnknownParent { hash, prev: header.prev_blockhash });
            }
            (0, header.work())
        } else {
            let parent = self
                .index
                .get(&header.prev_blockhash)
                .ok_or(ChainError::UnknownParent { hash, prev: header.prev_blockhash })?;
            let height = parent.height.checked_add(1).ok_or_else(|| ChainError::Store("height overflow".into()))?;
            (height, parent.chain_work + header.work())
        };
        self.index.insert(hash, HeaderEntry { header, height, chain_work, has_block: false });
        if self.active.is_empty() || chain_work > self.tip_work() {
            return self.set_tip(hash).map(Some);
        }
        Ok(None)
    }

    /// Makes `new_tip` the end of the best chain; returns the first height that changed.
    fn set_tip(&mut self, new_tip: BlockHash) -> Result<usize, ChainError> {
        let mut path = Vec::new();
        let mut cur = new_tip;
        let keep = loop {
            let e = self.index.get(&cur).ok_or_else(|| ChainError::Store(format!("index lost header {cur}")))?;
            if self.active.get(e.height as usize) == Some(&cur) {
                break e.height as usize + 1;
            }
            path.push(cur);
            if e.height == 0 {
                if !self.active.is_empty() {
                    return Err(ChainError::Store(format!("header {new_tip} descends from a foreign genesis")));
                }
                break 0;
            }
            cur = e.header.prev_blockhash;
        };
        self.active.truncate(keep);
        self.active.extend(path.into_iter().rev());
        Ok(keep)
    }
}

/// The all-zero hash: "no stop hash" in `getheaders`.
pub fn no_stop() -> BlockHash {
    BlockHash::all_zeros()
}

#[cfg(test)]
mod tests;
