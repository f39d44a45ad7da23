//! The persistent [`ChainBackend`]: one [redb](https://docs.rs/redb) file per network in the
//! peer's data directory, `<data-dir>/chain-<name>.redb`.
//!
//! redb is an embedded ACID key-value store (copy-on-write B-trees, two commit slots with
//! checksums): a write transaction is either entirely in the file after a crash or not at all,
//! so a `kill -9` at any moment leaves a consistent store. We commit
//!
//! * each batch of new headers **together with** the best-chain change it causes (one
//!   transaction: the index is never half-written),
//! * each block body (with its entry in the block index) in its own transaction,
//! * each pool transaction added or batch removed in its own transaction,
//!
//! all with [`redb::Durability::Immediate`] (fsync'd before `commit` returns; an added pool
//! transaction excepted: it is made durable by the next such commit) unless
//! [`ChainBackend::set_durable`] turned that off for a bulk load (then [`ChainBackend::flush`]
//! makes everything durable at once; commits stay atomic either way). Blocks that arrive
//! while a commit is running are committed together in the next one. On restart [`super::ChainStore::open`] rebuilds the
//! in-memory index from the `headers` table and knows every stored block from `block_index`,
//! so a sync resumes where it stopped and never downloads a stored block again.
//!
//! | table         | key                         | value                                   |
//! |---------------|-----------------------------|-----------------------------------------|
//! | `meta`        | `"magic"`, `"genesis"`, ... | network identity (checked at open)      |
//! | `headers`     | height (u32 BE) ‖ hash      | header (80 bytes) ‖ chain work (32, BE) |
//! | `best`        | height                      | hash on the best chain                  |
//! | `blocks`      | hash                        | block (consensus bytes, with witness)   |
//! | `block_index` | hash                        | its size in bytes                       |
//! | `pool`        | txid                        | time added (u64 LE) ‖ transaction bytes |

use std::path::{Path, PathBuf};

use anomos_proto::btc::NetParams;
use bitcoin::block::Header;
use bitcoin::hashes::Hash;
use bitcoin::{BlockHash, Txid, Work};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::store::{BestChainUpdate, ChainBackend, ChainStore, HeaderEntry, PoolTx};
use super::ChainError;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const HEADERS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("headers");
const BEST: TableDefinition<u32, &[u8]> = TableDefinition::new("best");
const BLOCKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("blocks");
const BLOCK_INDEX: TableDefinition<&[u8], u32> = TableDefinition::new("block_index");
const POOL: TableDefinition<&[u8], &[u8]> = TableDefinition::new("pool");

/// Layout version written to `meta`.
const FORMAT: u8 = 1;

fn se<E: Into<redb::Error>>(e: E) -> ChainError {
    ChainError::Store(e.into().to_string())
}

/// The file a network's store lives in: `<data_dir>/chain-<name>.redb` (the name reduced to
/// `[A-Za-z0-9_-]`).
pub fn store_path(data_dir: &Path, params: &NetParams) -> PathBuf {
    let name: String =
        params.name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    data_dir.join(format!("chain-{name}.redb"))
}

/// Opens (creating if needed) the persistent store of `params` in `data_dir`.
pub fn open_store(data_dir: &Path, params: &NetParams) -> Result<ChainStore, ChainError> {
    std::fs::create_dir_all(data_dir).map_err(|e| ChainError::Store(format!("{}: {e}", data_dir.display())))?;
    let backend = RedbBackend::open(&store_path(data_dir, params), params)?;
    ChainStore::open(params.clone(), Box::new(backend))
}

/// A [`ChainBackend`] in a redb file.
pub struct RedbBackend {
    db: Database,
    path: PathBuf,
    durable: bool,
}

impl std::fmt::Debug for RedbBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbBackend").field("path", &self.path).field("durable", &self.durable).finish()
    }
}

impl RedbBackend {
    /// Opens or creates the file at `path` for the network `params`; refuses a file written for
    /// another network. A file left by a crash is repaired by redb to its last commit.
    pub fn open(path: &Path, params: &NetParams) -> Result<RedbBackend, ChainError> {
        let db = Database::create(path).map_err(|e| ChainError::Store(format!("{}: {e}", path.display())))?;
        let tx = db.begin_write().map_err(se)?;
        {
            let mut meta = tx.open_table(META).map_err(se)?;
            let genesis = params.genesis_hash.to_byte_array();
            let stored_magic = meta.get("magic").map_err(se)?.map(|v| v.value().to_vec());
            let stored_genesis = meta.get("genesis").map_err(se)?.map(|v| v.value().to_vec());
            match (stored_magic, stored_genesis) {
                (Some(m), Some(g)) => {
                    if m != params.magic || g != genesis {
                        return Err(ChainError::Params(format!(
                            "{} holds another network's chain (magic {}, genesis {}), not {}",
                            path.display(),
                            hex::encode(&m),
                            BlockHash::from_slice(&g).map(|h| h.to_string()).unwrap_or_default(),
                            params.name
                        )));
                    }
                }
                _ => {
                    meta.insert("magic", params.magic.as_slice()).map_err(se)?;
                    meta.insert("genesis", genesis.as_slice()).map_err(se)?;
                    meta.insert("name", params.name.as_bytes()).map_err(se)?;
                    meta.insert("format", [FORMAT].as_slice()).map_err(se)?;
                }
            }
            tx.open_table(HEADERS).map_err(se)?;
            tx.open_table(BEST).map_err(se)?;
            tx.open_table(BLOCKS).map_err(se)?;
            tx.open_table(BLOCK_INDEX).map_err(se)?;
            tx.open_table(POOL).map_err(se)?;
        }
        tx.commit().map_err(se)?;
        Ok(RedbBackend { db, path: path.to_path_buf(), durable: true })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&self) -> Result<redb::WriteTransaction, ChainError> {
        let mut tx = self.db.begin_write().map_err(se)?;
        if !self.durable {
            tx.set_durability(Durability::None).map_err(se)?;
        }
        Ok(tx)
    }
}

fn header_key(height: u32, hash: &BlockHash) -> [u8; 36] {
    let mut k = [0u8; 36];
    k[..4].copy_from_slice(&height.to_be_bytes());
    k[4..].copy_from_slice(hash.as_byte_array());
    k
}

fn header_value(e: &HeaderEntry) -> Vec<u8> {
    let mut v = bitcoin::consensus::serialize(&e.header);
    v.extend_from_slice(&e.chain_work.to_be_bytes());
    v
}

fn decode_header_entry(key: &[u8], value: &[u8]) -> Result<HeaderEntry, ChainError> {
    let corrupt = || ChainError::Store("corrupt entry in the headers table".into());
    let height = u32::from_be_bytes(key.get(..4).and_then(|b| b.try_into().ok()).ok_or_else(corrupt)?);
    let header: Header =
        bitcoin::consensus::deserialize(value.get(..80).ok_or_else(corrupt)?).map_err(|_| corrupt())?;
    let work: [u8; 32] = value.get(80..112).and_then(|b| b.try_into().ok()).ok_or_else(corrupt)?;
    if key.get(4..) != Some(header.block_hash().as_byte_array().as_slice()) {
        return Err(corrupt());
    }
    Ok(HeaderEntry { header, height, chain_work: Work::from_be_bytes(work), has_block: false })
}

fn hash32<T: Hash<Bytes = [u8; 32]>>(bytes: &[u8]) -> Result<T, ChainError> {
    let arr: [u8; 32] = bytes.try_into().map_err(|_| ChainError::Store("corrupt hash in the store".into()))?;
    Ok(T::from_byte_array(arr))
}

impl ChainBackend for RedbBackend {
    fn put_headers(&mut self, entries: &[HeaderEntry], best: Option<BestChainUpdate<'_>>) -> Result<(), ChainError> {
        let tx = self.write()?;
        {
            let mut t = tx.open_table(HEADERS).map_err(se)?;
            for e in entries {
                let key = header_key(e.height, &e.header.block_hash());
                t.insert(key.as_slice(), header_value(e).as_slice()).map_err(se)?;
            }
            if let Some(b) = best {
                let mut bt = tx.open_table(BEST).map_err(se)?;
                let mut h = b.from;
                for hash in b.hashes {
                    bt.insert(h, hash.as_byte_array().as_slice()).map_err(se)?;
                    h = h.saturating_add(1);
                }
                while h < b.old_len {
                    bt.remove(h).map_err(se)?;
                    h += 1;
                }
            }
        }
        tx.commit().map_err(se)
    }

    fn load_headers(&self) -> Result<Vec<HeaderEntry>, ChainError> {
        let tx = self.db.begin_read().map_err(se)?;
        let t = tx.open_table(HEADERS).map_err(se)?;
        let mut out = Vec::with_capacity(usize::try_from(t.len().map_err(se)?).unwrap_or(0));
        for item in t.iter().map_err(se)? {
            let (k, v) = item.map_err(se)?;
            out.push(decode_header_entry(k.value(), v.value())?);
        }
        Ok(out)
    }

    fn load_best_chain(&self) -> Result<Vec<(u32, BlockHash)>, ChainError> {
        let tx = self.db.begin_read().map_err(se)?;
        let t = tx.open_table(BEST).map_err(se)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(se)? {
            let (k, v) = item.map_err(se)?;
            out.push((k.value(), hash32(v.value())?));
        }
        Ok(out)
    }

    fn put_block(&mut self, hash: &BlockHash, raw: &[u8]) -> Result<(), ChainError> {
        let tx = self.write()?;
        {
            let key = hash.as_byte_array().as_slice();
            tx.open_table(BLOCKS).map_err(se)?.insert(key, raw).map_err(se)?;
            let size = u32::try_from(raw.len()).unwrap_or(u32::MAX);
            tx.open_table(BLOCK_INDEX).map_err(se)?.insert(key, size).map_err(se)?;
        }
        tx.commit().map_err(se)
    }

    fn put_blocks(&mut self, blocks: &[(BlockHash, Vec<u8>)]) -> Result<(), ChainError> {
        let tx = self.write()?;
        {
            let mut bt = tx.open_table(BLOCKS).map_err(se)?;
            let mut it = tx.open_table(BLOCK_INDEX).map_err(se)?;
            for (hash, raw) in blocks {
                let key = hash.as_byte_array().as_slice();
                bt.insert(key, raw.as_slice()).map_err(se)?;
                it.insert(key, u32::try_from(raw.len()).unwrap_or(u32::MAX)).map_err(se)?;
            }
        }
        tx.commit().map_err(se)
    }

    fn set_durable(&mut self, durable: bool) {
        self.durable = durable;
    }

    fn flush(&mut self) -> Result<(), ChainError> {
        let tx = self.db.begin_write().map_err(se)?;
        tx.commit().map_err(se)
    }

    fn block_bytes(&self, hash: &BlockHash) -> Result<Option<Vec<u8>>, ChainError> {
        let tx = self.db.begin_read().map_err(se)?;
        let t = tx.open_table(BLOCKS).map_err(se)?;
        Ok(t.get(hash.as_byte_array().as_slice()).map_err(se)?.map(|v| v.value().to_vec()))
    }

    fn block_hashes(&self) -> Result<Vec<BlockHash>, ChainError> {
        let tx = self.db.begin_read().map_err(se)?;
        let t = tx.open_table(BLOCK_INDEX).map_err(se)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(se)? {
            let (k, _) = item.map_err(se)?;
            out.push(hash32(k.value())?);
        }
        Ok(out)
    }

    fn put_tx(&mut self, ptx: &PoolTx) -> Result<(), ChainError> {
        // Not fsync'd: the pool is a cache of others' transactions (Bitcoin Core writes its mempool only at
        // shutdown), and a commit per transaction under the store's write lock let a requester's flood of
        // transactions stall every conversation (SPEC open issue 26b). The next durable commit (headers,
        // blocks) makes it durable; a crash before that loses at most the newest pool entries.
        let mut tx = self.write()?;
        tx.set_durability(Durability::None).map_err(se)?;
        {
            let mut value = ptx.added.to_le_bytes().to_vec();
            value.extend_from_slice(&ptx.raw);
            tx.open_table(POOL)
                .map_err(se)?
                .insert(ptx.txid.as_byte_array().as_slice(), value.as_slice())
                .map_err(se)?;
        }
        tx.commit().map_err(se)
    }

    fn remove_txs(&mut self, txids: &[Txid]) -> Result<(), ChainError> {
        let tx = self.write()?;
        {
            let mut t = tx.open_table(POOL).map_err(se)?;
            for id in txids {
                t.remove(id.as_byte_array().as_slice()).map_err(se)?;
            }
        }
        tx.commit().map_err(se)
    }

    fn load_txs(&self) -> Result<Vec<PoolTx>, ChainError> {
        let tx = self.db.begin_read().map_err(se)?;
        let t = tx.open_table(POOL).map_err(se)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(se)? {
            let (k, v) = item.map_err(se)?;
            let v = v.value();
            let Some((time, raw)) = v.split_first_chunk::<8>() else {
                return Err(ChainError::Store("corrupt entry in the pool table".into()));
            };
            out.push(PoolTx { txid: hash32(k.value())?, raw: raw.to_vec(), added: u64::from_le_bytes(*time) });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::mine::{mine_on, mine_regtest};

    #[test]
    fn reopen_keeps_headers_blocks_best_chain_and_pool() {
        let dir = tempfile::tempdir().unwrap();
        let params = NetParams::regtest();
        let (tip, side_tip, txid) = {
            let mut store = open_store(dir.path(), &params).unwrap();
            let hashes = mine_regtest(&mut store, 30, 2).unwrap();
            // A longer side branch from height 20 takes over (reorg persisted with it).
            let mut side = hashes[19];
            for _ in 0..12 {
                side = mine_on(&mut store, side, 0).unwrap().block_hash();
            }
            assert_eq!(store.best_tip(), (side, 32));
            let tx = store.block(&hashes[29]).unwrap().unwrap().txdata[1].clone();
            let mut tx2 = tx.clone();
            tx2.input[0].previous_output.vout = 7;
            let txid = store.add_pool_tx(&tx2, 1000).unwrap().unwrap();
            (hashes[29], side, txid)
        };
        let store = open_store(dir.path(), &params).unwrap();
        assert_eq!(store.best_tip(), (side_tip, 32));
        assert_eq!(store.header_count(), 1 + 30 + 12);
        assert_eq!(store.block_count(), 1 + 30 + 12);
        assert!(store.has_block(&tip) && !store.is_active(&tip));
        assert!(store.has_pool_tx(&txid));
        let best = RedbBackend::open(&store_path(dir.path(), &params), &params);
        assert!(best.is_err(), "the file is locked by the open store");
        drop(store);
        let backend = RedbBackend::open(&store_path(dir.path(), &params), &params).unwrap();
        let best = backend.load_best_chain().unwrap();
        assert_eq!(best.last(), Some(&(32, side_tip)));
        assert_eq!(best.len(), 32, "heights 1..=32 (genesis is implicit)");
        drop(backend);
        // Another network's parameters are refused.
        let err = RedbBackend::open(&store_path(dir.path(), &params), &NetParams::testnet4()).unwrap_err();
        assert!(matches!(err, ChainError::Params(_)), "{err}");
    }
}
