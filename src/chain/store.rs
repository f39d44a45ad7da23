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

/// A transaction in the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolTx {
    /// Its txid.
    pub txid: Txid,
    /// Its serialization (witness included).
    pub raw: Vec<u8>,
    /// When it entered the pool (Unix seconds).
    pub added: u64,
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

/// Most bytes of transactions the pool holds (Bitcoin Core's default `-maxmempool` is 300 MB;
/// a peer on a circuit needs far less).
pub const MAX_POOL_BYTES: usize = 64 * 1024 * 1024;

/// How long a transaction stays in the pool unconfirmed (Bitcoin Core's `-mempoolexpiry`).
pub const POOL_EXPIRY_SECS: u64 = 14 * 24 * 60 * 60;

/// Why the pool did not take a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolReject {
    /// Already in the pool.
    Duplicate,
    /// An input is already spent by the pool transaction named.
    Conflict(Txid),
    /// The pool is full.
    Full,
}

impl std::fmt::Display for PoolReject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PoolReject::Duplicate => write!(f, "already in the pool"),
            PoolReject::Conflict(t) => write!(f, "spends an input that pool transaction {t} spends"),
            PoolReject::Full => write!(f, "the pool is full"),
        }
    }
}

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
        if locator.is_empty() {
            return self.header(stop).into_iter().collect();
        }
        let start = self.fork_point(locator);
        let mut out = Vec::new();
        let mut height = start.saturating_add(1);
        while out.len() < max {
            let Some(hash) = self.hash_at(height) else { break };
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

    // ---- the transaction pool ----

    /// Adds a transaction (already checked by the caller, see
    /// [`super::validate::check_pool_tx`]) to the pool and persists it.
    pub fn add_pool_tx(&mut self, tx: &Transaction, now: u64) -> Result<Result<Txid, PoolReject>, ChainError> {
        let txid = tx.compute_txid();
        if self.pool.contains_key(&txid) {
            return Ok(Err(PoolReject::Duplicate));
        }
        if let Some(other) = tx.input.iter().find_map(|i| self.pool_spent.get(&i.previous_output)) {
            return Ok(Err(PoolReject::Conflict(*other)));
        }
        let raw = bitcoin::consensus::serialize(tx);
        if self.pool_bytes + raw.len() > MAX_POOL_BYTES {
            self.expire_pool(now)?;
            if self.pool_bytes + raw.len() > MAX_POOL_BYTES {
                return Ok(Err(PoolReject::Full));
            }
        }
        let entry = PoolTx { txid, raw, added: now };
        self.backend.put_tx(&entry)?;
        self.pool_index(tx, entry);
        Ok(Ok(txid))
    }

    fn pool_index(&mut self, tx: &Transaction, entry: PoolTx) {
        for i in &tx.input {
            self.pool_spent.insert(i.previous_output, entry.txid);
        }
        self.pool_bytes += entry.raw.len();
        self.pool_order.push(entry.txid);
        self.pool.insert(entry.txid, entry);
    }

    /// Removes transactions from the pool (and the backend).
    pub fn remove_pool_txs(&mut self, txids: &[Txid]) -> Result<usize, ChainError> {
        let gone: HashSet<Txid> = txids.iter().filter(|t| self.pool.contains_key(*t)).copied().collect();
        if gone.is_empty() {
            return Ok(0);
        }
        let list: Vec<Txid> = gone.iter().copied().collect();
        self.backend.remove_txs(&list)?;
        for t in &list {
            if let Some(e) = self.pool.remove(t) {
                self.pool_bytes = self.pool_bytes.saturating_sub(e.raw.len());
            }
        }
        self.pool_spent.retain(|_, t| !gone.contains(t));
        self.pool_order.retain(|t| !gone.contains(t));
        Ok(list.len())
    }

    /// Drops pool transactions older than [`POOL_EXPIRY_SECS`]; returns how many.
    pub fn expire_pool(&mut self, now: u64) -> Result<usize, ChainError> {
        let old: Vec<Txid> =
            self.pool.values().filter(|e| e.added.saturating_add(POOL_EXPIRY_SECS) < now).map(|e| e.txid).collect();
        self.remove_pool_txs(&old)
    }

    fn remove_confirmed(&mut self, block: &Block) -> Result<(), ChainError> {
        let txids: Vec<Txid> = block.txdata.iter().map(|t| t.compute_txid()).collect();
        self.remove_pool_txs(&txids)?;
        // Pool transactions that conflict with the block's spends can never confirm.
        let spent: Vec<Txid> = block
            .txdata
            .iter()
            .flat_map(|t| t.input.iter().filter_map(|i| self.pool_spent.get(&i.previous_output).copied()))
            .collect();
        self.remove_pool_txs(&spent)?;
        Ok(())
    }

    /// Whether `txid` is in the pool.
    pub fn has_pool_tx(&self, txid: &Txid) -> bool {
        self.pool.contains_key(txid)
    }

    /// A pool transaction's serialization.
    pub fn pool_tx_bytes(&self, txid: &Txid) -> Option<&[u8]> {
        self.pool.get(txid).map(|e| e.raw.as_slice())
    }

    /// A pool transaction.
    pub fn pool_tx(&self, txid: &Txid) -> Option<Transaction> {
        self.pool_tx_bytes(txid).and_then(|raw| bitcoin::consensus::deserialize(raw).ok())
    }

    /// Pool txids in arrival order.
    pub fn pool_txids(&self) -> Vec<Txid> {
        self.pool_order.clone()
    }

    /// Number of pool transactions and their total size in bytes.
    pub fn pool_size(&self) -> (usize, usize) {
        (self.pool.len(), self.pool_bytes)
    }
}

/// The all-zero hash: "no stop hash" in `getheaders`.
pub fn no_stop() -> BlockHash {
    BlockHash::all_zeros()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::mine::{mine_on, mine_regtest};

    fn chain(n: u32) -> (ChainStore, Vec<BlockHash>) {
        let mut store = ChainStore::new(NetParams::regtest()).unwrap();
        let mut hashes = vec![store.best_tip().0];
        hashes.extend(mine_regtest(&mut store, n, 0).unwrap());
        (store, hashes)
    }

    fn heights(store: &ChainStore, hashes: &[BlockHash]) -> Vec<u32> {
        hashes.iter().map(|h| store.height_of(h).unwrap()).collect()
    }

    #[test]
    fn locator_shape() {
        let (store, hashes) = chain(1000);
        assert_eq!(store.best_tip(), (hashes[1000], 1000));
        let loc = store.locator();
        let hs = heights(&store, &loc);
        // Dense for the tip and 10 predecessors, then doubling steps, ending at genesis.
        assert_eq!(&hs[..11], &(990..=1000).rev().collect::<Vec<_>>()[..]);
        let mut expected = hs[..11].to_vec();
        let (mut h, mut step) = (990u32, 1u32);
        while h > 0 {
            h = h.saturating_sub(step);
            expected.push(h);
            if expected.len() > 10 {
                step *= 2;
            }
        }
        assert_eq!(hs, expected);
        assert_eq!(loc.last(), Some(&store.params().genesis_hash));
        assert!(hs.windows(2).all(|w| w[0] > w[1]));
        assert!(loc.len() < 30);
        for (h, hash) in hs.iter().zip(&loc) {
            assert_eq!(hashes[*h as usize], *hash);
        }
    }

    #[test]
    fn locator_small_chains() {
        let (store, hashes) = chain(5);
        assert_eq!(store.locator(), hashes.iter().rev().copied().collect::<Vec<_>>());
        let (store, hashes) = chain(0);
        assert_eq!(store.locator(), vec![hashes[0]]);
        assert!(store.locator_from(&BlockHash::all_zeros()).is_empty());
    }

    #[test]
    fn headers_after_answers_like_core() {
        let (store, hashes) = chain(3000);
        let hdr = |h: usize| store.header(&hashes[h]).unwrap();

        // From genesis: 2000 headers, 1..=2000.
        let got = store.headers_after(&[hashes[0]], &no_stop(), 2000);
        assert_eq!(got.len(), 2000);
        assert_eq!(got[0], hdr(1));
        assert_eq!(got[1999], hdr(2000));

        // A locator from height 2000: the rest.
        let got = store.headers_after(&store.locator_from(&hashes[2000]), &no_stop(), 2000);
        assert_eq!(got.len(), 1000);
        assert_eq!(got[0], hdr(2001));
        assert_eq!(got.last(), Some(&hdr(3000)));

        // The first known locator entry wins; unknown ones are skipped.
        let got = store.headers_after(&[BlockHash::all_zeros(), hashes[10], hashes[5]], &no_stop(), 2000);
        assert_eq!(got[0], hdr(11));

        // Stop hash ends the answer (inclusive); max caps it.
        let got = store.headers_after(&[hashes[10]], &hashes[15], 2000);
        assert_eq!(got, (11..=15).map(hdr).collect::<Vec<_>>());
        assert_eq!(store.headers_after(&[hashes[10]], &no_stop(), 3).len(), 3);

        // At the tip: nothing. Nothing known: from genesis.
        assert!(store.headers_after(&[hashes[3000]], &no_stop(), 2000).is_empty());
        assert_eq!(store.headers_after(&[BlockHash::all_zeros()], &no_stop(), 1), vec![hdr(1)]);

        // Empty locator: just the stop header.
        assert_eq!(store.headers_after(&[], &hashes[7], 2000), vec![hdr(7)]);
        assert!(store.headers_after(&[], &BlockHash::all_zeros(), 2000).is_empty());
    }

    #[test]
    fn most_work_wins_and_locators_follow_reorgs() {
        let (mut store, hashes) = chain(10);
        // A side branch from height 7: 3 blocks is less work than the 3 blocks on the main chain
        // above 7 (equal work: the first seen stays), 4 blocks is more.
        let mut side = vec![hashes[7]];
        for _ in 0..3 {
            let b = mine_on(&mut store, *side.last().unwrap(), 0).unwrap();
            side.push(b.block_hash());
        }
        assert_eq!(store.best_tip(), (hashes[10], 10));
        assert!(!store.is_active(&side[1]));
        assert_eq!(store.height_of(&side[3]), Some(10));
        assert_eq!(store.ancestor(&side[3], 7), Some(hashes[7]));
        assert_eq!(store.ancestor(&side[3], 9), Some(side[2]));

        // Asked by a peer on the side branch: fork at 7, answer the main chain from 8.
        let got = store.headers_after(&store.locator_from(&side[3]), &no_stop(), 2000);
        assert_eq!(got.first(), store.header(&hashes[8]).as_ref());

        let b = mine_on(&mut store, side[3], 0).unwrap();
        side.push(b.block_hash());
        assert_eq!(store.best_tip(), (side[4], 11));
        assert!(store.is_active(&side[1]) && !store.is_active(&hashes[8]));
        assert_eq!(store.hash_at(8), Some(side[1]));
        let loc = store.locator();
        assert_eq!(&loc[..5], &[side[4], side[3], side[2], side[1], hashes[7]]);
        // A peer still on the old branch gets the new one from the fork.
        let got = store.headers_after(&store.locator_from(&hashes[10]), &no_stop(), 2000);
        assert_eq!(got.len(), 4);
        assert_eq!(got[0], store.header(&side[1]).unwrap());
        assert!(store.tip_work() > store.entry(&hashes[10]).unwrap().chain_work);
    }

    #[test]
    fn unknown_parent_and_reopen() {
        let (mut store, hashes) = chain(3);
        let mut orphan = store.header(&hashes[2]).unwrap();
        orphan.prev_blockhash = BlockHash::all_zeros();
        assert!(matches!(store.insert_header(orphan), Err(ChainError::UnknownParent { .. })));
        assert_eq!(store.header_count(), 4);
        assert_eq!(store.block_count(), 4);
        assert_eq!(store.median_time_past(&hashes[3]), Some(store.header(&hashes[2]).unwrap().time));
        assert!(store.block(&hashes[3]).unwrap().is_some());
        assert!(store.block(&BlockHash::all_zeros()).unwrap().is_none());
        assert_eq!(store.missing_blocks(0, 10), vec![]);

        // Headers without bodies are reported missing, oldest first.
        let mut other = ChainStore::new(NetParams::regtest()).unwrap();
        let headers: Vec<Header> = hashes[1..].iter().map(|h| store.header(h).unwrap()).collect();
        assert_eq!(other.insert_headers(&headers).unwrap(), 3);
        assert_eq!(other.insert_headers(&headers).unwrap(), 0);
        assert_eq!(other.best_tip(), store.best_tip());
        assert_eq!(other.missing_blocks(0, 2), hashes[1..3].to_vec());

        // Reopening a backend rebuilds the index.
        let mut backend = MemoryBackend::default();
        let entries: Vec<HeaderEntry> = hashes[1..].iter().map(|h| *store.entry(h).unwrap()).collect();
        backend.put_headers(&entries, None).unwrap();
        let b2 = store.block_bytes(&hashes[2]).unwrap().unwrap();
        backend.put_block(&hashes[2], &b2).unwrap();
        let reopened = ChainStore::open(NetParams::regtest(), Box::new(backend)).unwrap();
        assert_eq!(reopened.best_tip(), store.best_tip());
        assert!(reopened.has_block(&hashes[2]) && !reopened.has_block(&hashes[1]));
        assert_eq!(reopened.block_count(), 2);
    }
}
