//! The chain store: a header tree with cumulative work, the best chain, and block bodies.
//!
//! [`ChainStore`] keeps every known header in memory (about 150 bytes each, as Bitcoin Core's
//! block index does) together with its height, the chain's cumulative [`Work`] up to it and
//! whether its body is stored. The best chain is the one with the most work (the first seen
//! wins ties) and is kept as a height-indexed vector, so "hash at height" and "is on the best
//! chain" are O(1); a header with more work than the tip re-points the vector (reorg).
//!
//! What must survive a restart goes through a [`ChainBackend`]: headers in insertion order
//! (parents before children) and raw block bodies. [`MemoryBackend`] keeps them in memory; a
//! persistent backend (redb) implements the same five methods and [`ChainStore::open`] rebuilds
//! the index from it.
//!
//! The store checks structure only (a header's parent must be known). Consensus checks are the
//! caller's job (see [`super::validate`]), before inserting.

use std::collections::HashMap;

use anomos_proto::btc::NetParams;
use bitcoin::block::Header;
use bitcoin::hashes::Hash;
use bitcoin::{Block, BlockHash, Work};

use super::ChainError;

/// Where headers and block bodies are kept.
///
/// Implementations store what they are given and hand it back; they do not validate. Errors are
/// I/O or corruption ([`ChainError::Store`]).
pub trait ChainBackend: Send + Sync {
    /// Persists headers (already indexed by the store), in this order.
    fn put_headers(&mut self, headers: &[Header]) -> Result<(), ChainError>;
    /// All persisted headers, parents before children (insertion order does that).
    fn load_headers(&self) -> Result<Vec<Header>, ChainError>;
    /// Persists a block body (consensus serialization, witness included).
    fn put_block(&mut self, hash: &BlockHash, raw: &[u8]) -> Result<(), ChainError>;
    /// A stored block body.
    fn block_bytes(&self, hash: &BlockHash) -> Result<Option<Vec<u8>>, ChainError>;
    /// Hashes of all stored block bodies.
    fn block_hashes(&self) -> Result<Vec<BlockHash>, ChainError>;
}

/// A backend that keeps everything in memory (tests, short-lived nodes).
#[derive(Debug, Default)]
pub struct MemoryBackend {
    headers: Vec<Header>,
    blocks: HashMap<BlockHash, Vec<u8>>,
}

impl ChainBackend for MemoryBackend {
    fn put_headers(&mut self, headers: &[Header]) -> Result<(), ChainError> {
        self.headers.extend_from_slice(headers);
        Ok(())
    }
    fn load_headers(&self) -> Result<Vec<Header>, ChainError> {
        Ok(self.headers.clone())
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
            .finish()
    }
}

impl ChainStore {
    /// An in-memory store holding only the genesis block of a known network.
    pub fn new(params: NetParams) -> Result<ChainStore, ChainError> {
        Self::open(params, Box::new(MemoryBackend::default()))
    }

    /// Opens a store over `backend`, reloading whatever it holds (known networks only).
    pub fn open(params: NetParams, backend: Box<dyn ChainBackend>) -> Result<ChainStore, ChainError> {
        let genesis = params.genesis_block().ok_or_else(|| {
            ChainError::Params(format!("no genesis block known for {}; use open_with_genesis", params.name))
        })?;
        Self::open_with_genesis(params, genesis, backend)
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
        let mut store = ChainStore { params, index: HashMap::new(), active: vec![hash], blocks: 0, backend };
        store.index.insert(
            hash,
            HeaderEntry { header: genesis.header, height: 0, chain_work: genesis.header.work(), has_block: false },
        );
        for header in store.backend.load_headers()? {
            if !store.index.contains_key(&header.block_hash()) {
                store.index_header(header)?;
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
        if !store.has_block(&hash) {
            store.insert_block(&genesis)?;
        }
        Ok(store)
    }

    /// The network this store is for.
    pub fn params(&self) -> &NetParams {
        &self.params
    }

    /// Adds a header whose parent is known. Returns false if it was already known.
    pub fn insert_header(&mut self, header: Header) -> Result<bool, ChainError> {
        if self.index.contains_key(&header.block_hash()) {
            return Ok(false);
        }
        self.index_header(header)?;
        self.backend.put_headers(&[header])?;
        Ok(true)
    }

    /// Adds headers in order (each one's parent must be known by the time it comes). Returns how
    /// many were new. On error, the headers before the failing one stay inserted.
    pub fn insert_headers(&mut self, headers: &[Header]) -> Result<usize, ChainError> {
        let mut added = Vec::new();
        let mut result = Ok(());
        for header in headers {
            if self.index.contains_key(&header.block_hash()) {
                continue;
            }
            if let Err(e) = self.index_header(*header) {
                result = Err(e);
                break;
            }
            added.push(*header);
        }
        if !added.is_empty() {
            self.backend.put_headers(&added)?;
        }
        result.map(|()| added.len())
    }

    /// Stores a block body, adding its header first if needed (its parent must be known).
    /// Returns false if the body was already stored. Nothing is validated here.
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
        Ok(true)
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
        self.active.iter().skip(from_height as usize).filter(|h| !self.has_block(h)).take(limit).copied().collect()
    }

    /// Puts a header into the index (parent must be known) and moves the best chain if it now
    /// has the most work.
    fn index_header(&mut self, header: Header) -> Result<(), ChainError> {
        let hash = header.block_hash();
        let parent = self
            .index
            .get(&header.prev_blockhash)
            .ok_or(ChainError::UnknownParent { hash, prev: header.prev_blockhash })?;
        let height = parent.height.checked_add(1).ok_or_else(|| ChainError::Store("height overflow".into()))?;
        let chain_work = parent.chain_work + header.work();
        self.index.insert(hash, HeaderEntry { header, height, chain_work, has_block: false });
        if chain_work > self.tip_work() {
            self.set_tip(hash)?;
        }
        Ok(())
    }

    /// Makes `new_tip` the end of the best chain.
    fn set_tip(&mut self, new_tip: BlockHash) -> Result<(), ChainError> {
        let mut path = Vec::new();
        let mut cur = new_tip;
        let fork_height = loop {
            let e = self.index.get(&cur).ok_or_else(|| ChainError::Store(format!("index lost header {cur}")))?;
            if self.active.get(e.height as usize) == Some(&cur) {
                break e.height;
            }
            if e.height == 0 {
                return Err(ChainError::Store(format!("header {new_tip} descends from a foreign genesis")));
            }
            path.push(cur);
            cur = e.header.prev_blockhash;
        };
        self.active.truncate(fork_height as usize + 1);
        self.active.extend(path.into_iter().rev());
        Ok(())
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
        backend.put_headers(&headers).unwrap();
        let b2 = store.block_bytes(&hashes[2]).unwrap().unwrap();
        backend.put_block(&hashes[2], &b2).unwrap();
        let reopened = ChainStore::open(NetParams::regtest(), Box::new(backend)).unwrap();
        assert_eq!(reopened.best_tip(), store.best_tip());
        assert!(reopened.has_block(&hashes[2]) && !reopened.has_block(&hashes[1]));
        assert_eq!(reopened.block_count(), 2);
    }
}
