//! The transaction pool of the chain store: transactions in arrival order, the outpoints they spend, a
//! byte cap and an expiry.

use super::*;

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

/// Most bytes of transactions the pool holds (Bitcoin Core's default `-maxmempool` is 300 MB;
/// a peer on a circuit needs far less).
pub const MAX_POOL_BYTES: usize = 64 * 1024 * 1024;

/// How long a transaction stays in the pool unconfirmed (Bitcoin Core's `-mempoolexpiry`).
pub const POOL_EXPIRY_SECS: u64 = 14 * 24 * 60 * 60;

/// Most pool transactions kept, once a block confirmed them, to answer `getdata` (as Bitcoin Core answers for
/// transactions it relayed lately, not only from its mempool): a peer that sent a transaction and asks for it
/// back right away must not get `notfound` because a block took it in between (found by
/// `tests/chain_process.rs` in session 15: `send-tx` reported a transaction mined within that round trip as not
/// kept).
pub const RECENT_TXS: usize = 1000;
/// Most bytes of such transactions kept.
pub const RECENT_BYTES: usize = 4 * 1024 * 1024;

/// Pool transactions confirmed lately, oldest first, bounded by [`RECENT_TXS`] and [`RECENT_BYTES`].
#[derive(Debug, Default)]
pub(super) struct Recent {
    txs: HashMap<Txid, Vec<u8>>,
    order: std::collections::VecDeque<Txid>,
    bytes: usize,
}

impl Recent {
    fn add(&mut self, e: PoolTx) {
        if self.txs.contains_key(&e.txid) || e.raw.len() > RECENT_BYTES {
            return;
        }
        self.bytes += e.raw.len();
        self.order.push_back(e.txid);
        self.txs.insert(e.txid, e.raw);
        while self.order.len() > RECENT_TXS || self.bytes > RECENT_BYTES {
            let Some(old) = self.order.pop_front() else { break };
            if let Some(raw) = self.txs.remove(&old) {
                self.bytes = self.bytes.saturating_sub(raw.len());
            }
        }
    }
}

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

impl ChainStore {
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

    pub(super) fn pool_index(&mut self, tx: &Transaction, entry: PoolTx) {
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

    pub(super) fn remove_confirmed(&mut self, block: &Block) -> Result<(), ChainError> {
        let txids: Vec<Txid> = block.txdata.iter().map(|t| t.compute_txid()).collect();
        let confirmed: Vec<PoolTx> = txids.iter().filter_map(|t| self.pool.get(t).cloned()).collect();
        self.remove_pool_txs(&txids)?;
        for e in confirmed {
            self.recent.add(e);
        }
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

    /// A transaction to answer `getdata` with: in the pool, or taken from it by a block lately ([`RECENT_TXS`]).
    pub fn relay_tx(&self, txid: &Txid) -> Option<Transaction> {
        let raw = self.pool_tx_bytes(txid).or_else(|| self.recent.txs.get(txid).map(Vec::as_slice))?;
        bitcoin::consensus::deserialize(raw).ok()
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
