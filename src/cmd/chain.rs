//! `anomos chain`: work on a peer's chain store offline.
//!
//! * `anomos chain import FILE --chain mainnet --data-dir DIR` validates and stores real blocks from a file:
//!   Bitcoin Core's raw `blk*.dat` format (network magic, u32 LE length, block; repeated; zero padding at
//!   the end is fine; blocks may come out of order) or one hex-encoded block per line. The store's genesis
//!   is its root (a custom network's store takes the genesis block from the file). Then
//!   `anomos peer --serve mainnet --data-dir DIR` serves them.
//! * `anomos chain info --chain NAME --data-dir DIR` prints what the store holds.
//! * `anomos chain mine --height N [--mine-txs K] --data-dir DIR` mines a regtest chain offline (the same
//!   blocks `anomos peer --serve regtest --mine N` would; copies of the file serve several peers).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anomos_proto::btc::import::parse_blocks;
use anomos_proto::btc::NetParams;
use bitcoin::{Block, BlockHash};
use clap::{Args, Subcommand};

use crate::chain::mine::unix_now;
use crate::chain::validate::{check_block_in_context, check_genesis_header, check_header};
use crate::chain::{self, ChainError, ChainStore};
use crate::error::PeerError;

/// Flags that define a custom network (one that is not mainnet, testnet3, testnet4, signet or
/// regtest): its name is the chain name given to `--serve`/`--chain`.
#[derive(Args, Debug, Clone, Default)]
pub struct NetArgs {
    /// Custom network: its 4 magic bytes in hex (e.g. `f00dbabe`); needs `--genesis`.
    #[arg(long, value_name = "HEX", requires = "genesis")]
    pub network_magic: Option<String>,
    /// Custom network: its genesis block hash (hex, as block explorers show it).
    #[arg(long, value_name = "HASH", requires = "network_magic")]
    pub genesis: Option<String>,
}

impl NetArgs {
    /// The parameters of the chain called `name`: a known network, or the custom one these
    /// flags describe (named `name`).
    pub fn params(&self, name: &str) -> Result<NetParams, PeerError> {
        match (&self.network_magic, &self.genesis) {
            (Some(magic), Some(genesis)) => {
                let m = hex::decode(magic.trim_start_matches("0x"))
                    .ok()
                    .and_then(|b| <[u8; 4]>::try_from(b).ok())
                    .ok_or_else(|| PeerError::Config(format!("--network-magic {magic}: expected 4 bytes in hex")))?;
                let g: bitcoin::BlockHash =
                    genesis.parse().map_err(|e| PeerError::Config(format!("--genesis {genesis}: {e}")))?;
                if let Some(known) = NetParams::by_name(name) {
                    if known.magic != m || known.genesis_hash != g {
                        return Err(PeerError::Config(format!(
                            "{name} is a known network with other parameters; pick another name"
                        )));
                    }
                    return Ok(known);
                }
                if name.is_empty() || name.len() > 32 {
                    return Err(PeerError::Config("a custom chain name must have 1..=32 characters".into()));
                }
                Ok(NetParams::custom(name, m, g, 0))
            }
            _ => NetParams::by_name(name).ok_or_else(|| {
                PeerError::Config(format!(
                    "unknown chain {name:?}: use mainnet, testnet3, testnet4, signet, regtest, or give a custom \
                     network's --network-magic and --genesis"
                ))
            }),
        }
    }
}

/// Flags of `anomos chain`.
#[derive(Args, Debug, Clone)]
pub struct ChainArgs {
    #[command(subcommand)]
    pub cmd: ChainCmd,
}

/// `anomos chain` subcommands.
#[derive(Subcommand, Debug, Clone)]
pub enum ChainCmd {
    /// Validate and store blocks from a blk*.dat file or a file of hex blocks (one per line).
    Import(ImportArgs),
    /// Print what a chain store holds.
    Info(StoreArgs),
    /// Mine a regtest chain offline, up to a height.
    Mine(MineArgs),
}

/// Flags of `anomos chain mine`.
#[derive(Args, Debug, Clone)]
pub struct MineArgs {
    /// Mine until the best chain is this high.
    #[arg(long, value_name = "N")]
    pub height: u32,
    /// Extra transactions per block (1-in-2-out P2WPKH-shaped, 222 bytes each).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub mine_txs: usize,
    #[command(flatten)]
    pub store: StoreArgs,
}

/// Which store.
#[derive(Args, Debug, Clone)]
pub struct StoreArgs {
    /// The chain (mainnet, testnet3, testnet4, signet, regtest, or a custom name with --network-magic/--genesis).
    #[arg(long, default_value = "regtest")]
    pub chain: String,
    #[command(flatten)]
    pub net: NetArgs,
    /// The peer's data directory (the store is <data-dir>/chain-<name>.redb).
    #[arg(long, value_name = "DIR", default_value = "./anomos-data")]
    pub data_dir: PathBuf,
}

/// Flags of `anomos chain import`.
#[derive(Args, Debug, Clone)]
pub struct ImportArgs {
    /// The file: raw blk*.dat format, or one hex block per line.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    #[command(flatten)]
    pub store: StoreArgs,
}

/// What an import did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ImportReport {
    /// Blocks read from the file.
    pub read: usize,
    /// New blocks validated and stored.
    pub imported: usize,
    /// Blocks already stored.
    pub known: usize,
    /// Blocks whose parent is neither in the file nor in the store.
    pub orphans: usize,
}

/// Validates and stores `blocks` (any order) into `store`: each one's header against its parent
/// (PoW, difficulty, timestamps, version), then the block (merkle root, witness commitment,
/// sizes, BIP 34). Stops at the first invalid block (what came before stays stored).
pub fn import_blocks(store: &mut ChainStore, blocks: Vec<Block>) -> Result<ImportReport, ChainError> {
    let params = store.params().clone();
    let mut report = ImportReport { read: blocks.len(), ..Default::default() };
    let mut waiting: HashMap<BlockHash, Vec<Block>> = HashMap::new();
    let mut ready = Vec::new();
    for b in blocks {
        let hash = b.block_hash();
        if store.has_block(&hash) {
            report.known += 1;
            continue;
        }
        let connects = if store.is_rooted() {
            store.entry(&b.header.prev_blockhash).is_some() || store.entry(&hash).is_some()
        } else {
            hash == params.genesis_hash
        };
        if connects {
            ready.push(b);
        } else {
            waiting.entry(b.header.prev_blockhash).or_default().push(b);
        }
        while let Some(b) = ready.pop() {
            let hash = b.block_hash();
            import_one(store, &params, &b)?;
            report.imported += 1;
            if let Some(children) = waiting.remove(&hash) {
                ready.extend(children);
            }
        }
    }
    report.orphans = waiting.values().map(Vec::len).sum();
    Ok(report)
}

fn import_one(store: &mut ChainStore, params: &NetParams, block: &Block) -> Result<(), ChainError> {
    let hash = block.block_hash();
    let height = if !store.is_rooted() {
        check_genesis_header(params, &block.header)?;
        0
    } else if let Some(e) = store.entry(&hash) {
        e.height
    } else {
        check_header(store, params, &block.header, unix_now())?
    };
    check_block_in_context(block, params, height)?;
    store.insert_block(block)?;
    Ok(())
}

fn open(args: &StoreArgs) -> Result<ChainStore, PeerError> {
    let params = args.net.params(&args.chain)?;
    super::ensure_private_dir(&args.data_dir)?;
    Ok(chain::open_store(&args.data_dir, &params)?)
}

fn print_info(store: &ChainStore, path: &Path) {
    let (tip, height) = store.best_tip();
    let (pool, pool_bytes) = store.pool_size();
    println!(
        "chain={} store={} headers={} blocks={} height={height} tip={tip} missing={} pool={pool} pool_bytes={pool_bytes}",
        store.params().name,
        path.display(),
        store.header_count().saturating_sub(1),
        store.block_count().saturating_sub(1),
        store.missing_from(0).count()
    );
}

/// Runs `anomos chain …`.
pub fn run(args: &ChainArgs) -> Result<(), PeerError> {
    match &args.cmd {
        ChainCmd::Info(a) => {
            let store = open(a)?;
            print_info(&store, &chain::store_path(&a.data_dir, store.params()));
        }
        ChainCmd::Mine(a) => {
            let t = std::time::Instant::now();
            let mut store = open(&a.store)?;
            let have = store.best_tip().1;
            store.set_durable(false);
            let result = crate::chain::mine_regtest(&mut store, a.height.saturating_sub(have), a.mine_txs);
            store.set_durable(true);
            store.flush()?;
            let mined = result?.len();
            println!("mined blocks={mined} time={:.2}s", t.elapsed().as_secs_f64());
            print_info(&store, &chain::store_path(&a.store.data_dir, store.params()));
        }
        ChainCmd::Import(a) => {
            let t = std::time::Instant::now();
            let data = std::fs::read(&a.file).map_err(|e| PeerError::Config(format!("{}: {e}", a.file.display())))?;
            let mut store = open(&a.store)?;
            let blocks = parse_blocks(&data, store.params().magic)
                .map_err(|e| PeerError::Chain(format!("{}: {e}", a.file.display())))?;
            store.set_durable(false);
            let result = import_blocks(&mut store, blocks);
            store.set_durable(true);
            store.flush()?;
            let r = result?;
            println!(
                "imported file={} read={} imported={} known={} orphans={} time={:.2}s",
                a.file.display(),
                r.read,
                r.imported,
                r.known,
                r.orphans,
                t.elapsed().as_secs_f64()
            );
            print_info(&store, &chain::store_path(&a.store.data_dir, store.params()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLOCKS: [&str; 4] = [
        include_str!("../../proto/tests/vectors/bitcoin/mainnet_genesis.hex"),
        include_str!("../../proto/tests/vectors/bitcoin/mainnet_block1.hex"),
        include_str!("../../proto/tests/vectors/bitcoin/mainnet_block2.hex"),
        include_str!("../../proto/tests/vectors/bitcoin/mainnet_block3.hex"),
    ];

    #[test]
    fn blk_files_in_any_order_and_hex_lines_import() {
        let params = NetParams::mainnet();
        let raw: Vec<Vec<u8>> = BLOCKS.iter().map(|h| hex::decode(h.trim()).unwrap()).collect();
        // blk*.dat: out of order, zero padding at the end.
        let mut blk = Vec::new();
        for i in [3, 0, 2, 1] {
            blk.extend_from_slice(&params.magic);
            blk.extend_from_slice(&(raw[i].len() as u32).to_le_bytes());
            blk.extend_from_slice(&raw[i]);
        }
        blk.extend_from_slice(&[0; 64]);
        let blocks = parse_blocks(&blk, params.magic).unwrap();
        assert_eq!(blocks.len(), 4);
        let mut store = ChainStore::new(params.clone()).unwrap();
        let r = import_blocks(&mut store, blocks).unwrap();
        assert_eq!(r, ImportReport { read: 4, imported: 3, known: 1, orphans: 0 });
        assert_eq!(store.best_tip().1, 3);
        assert_eq!(store.best_tip().0.to_string(), "0000000082b5015589a3fdf2d4baff403e6f0be035a5d9742c1cae6295464449");

        // Hex lines; a block whose parent is missing is an orphan.
        let text = format!("# mainnet\n{}\n\n{}\n", BLOCKS[1].trim(), BLOCKS[3].trim());
        let blocks = parse_blocks(text.as_bytes(), params.magic).unwrap();
        let mut store = ChainStore::new(params.clone()).unwrap();
        let r = import_blocks(&mut store, blocks).unwrap();
        assert_eq!((r.imported, r.orphans), (1, 1));

        // A tampered block is refused and nothing after it is stored.
        let mut bad = raw[2].clone();
        let last = bad.len() - 10;
        bad[last] ^= 1;
        let text = format!("{}\n{}\n", BLOCKS[1].trim(), hex::encode(&bad));
        let blocks = parse_blocks(text.as_bytes(), params.magic).unwrap();
        let mut store = ChainStore::new(params).unwrap();
        assert!(import_blocks(&mut store, blocks).is_err());
        assert_eq!(store.best_tip().1, 1);
        assert!(parse_blocks(b"zz", [0; 4]).is_err());
    }
}
