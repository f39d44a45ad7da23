//! The chain layer in a simulation: a few peers serve a real regtest chain with the real [`ChainService`] (some of
//! them lying, with [`Misbehave`]), and honest peers sync it with the real sync engine over circuits, replacing
//! circuits through the tracker as `anomos fetch` does, while the faults and the hostile peers run.
//!
//! The invariant: every sync ends with every block of the served chain stored, each the served block byte for byte,
//! nothing else stored (a lie never gets in), within a bound once the network has healed; a sync ends early only
//! when its peer is killed. One more sync starts when the network heals, so every seed checks at least one.

use anomos::chain::{self, ChainService, ChainStore, Misbehave, SharedStore, SyncEvent, SyncOptions};
use anomos_proto::btc::NetParams as ChainParams;
use bitcoin::{Block, BlockHash};

use super::*;

/// Blocks of the served chain above the genesis block.
const BLOCKS: u32 = 60;

/// How long after the network heals every sync must be done.
pub(super) const SYNC_BOUND: Duration = Duration::from_secs(150);

/// The chain the serving peers serve: mined at the start of each run (on the simulated clock, so it replays).
pub(super) struct Reference {
    blocks: Vec<Block>,
    tip: BlockHash,
}

impl Reference {
    pub(super) fn mine() -> Reference {
        let mut store = ChainStore::new(ChainParams::regtest()).expect("a regtest store");
        chain::mine_regtest(&mut store, BLOCKS, 2).expect("mining regtest blocks");
        let blocks: Vec<Block> = (0..=BLOCKS)
            .map(|h| {
                let hash = store.hash_at(h).expect("a mined height");
                store.block(&hash).expect("the store answers").expect("a mined block")
            })
            .collect();
        let tip = store.best_tip().0;
        Reference { blocks, tip }
    }

    /// The served chain's height.
    pub(super) fn height(&self) -> u32 {
        BLOCKS
    }

    /// The served block at `h` (at most [`Reference::height`]).
    pub(super) fn block(&self, h: u32) -> Block {
        self.blocks[h as usize].clone()
    }

    /// The served block hash at `h` (at most [`Reference::height`]).
    pub(super) fn hash_at(&self, h: u32) -> BlockHash {
        self.blocks[h as usize].block_hash()
    }

    /// A serving peer's store: the whole chain.
    fn store(&self) -> SharedStore {
        let mut store = ChainStore::new(ChainParams::regtest()).expect("a regtest store");
        let headers: Vec<_> = self.blocks[1..].iter().map(|b| b.header).collect();
        store.insert_headers(&headers).expect("the reference headers store");
        store.insert_blocks(&self.blocks[1..]).expect("the reference chain stores");
        chain::shared(store)
    }

    /// Whether `store` holds exactly the served chain.
    fn check(&self, store: &SharedStore) -> Result<(), String> {
        let s = store.read().unwrap();
        let (tip, height) = s.best_tip();
        if tip != self.tip || height != BLOCKS {
            return Err(format!("best tip {tip} at {height}, the served chain's is {} at {BLOCKS}", self.tip));
        }
        for (h, b) in self.blocks.iter().enumerate() {
            let hash = b.block_hash();
            if s.hash_at(h as u32) != Some(hash) {
                return Err(format!("height {h} holds {:?}, the served chain has {hash}", s.hash_at(h as u32)));
            }
            match s.block_bytes(&hash) {
                Ok(Some(bytes)) if bytes == bitcoin::consensus::serialize(b) => {}
                Ok(Some(_)) => return Err(format!("the block at height {h} differs from the one served")),
                Ok(None) => return Err(format!("the block at height {h} is missing")),
                Err(e) => return Err(format!("the block at height {h} cannot be read: {e}")),
            }
        }
        if s.block_count() != self.blocks.len() || s.header_count() != self.blocks.len() {
            return Err(format!(
                "{} blocks and {} headers stored, the served chain has {}",
                s.block_count(),
                s.header_count(),
                self.blocks.len()
            ));
        }
        Ok(())
    }
}

/// What a chain-serving peer does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    /// Serves the chain as it is.
    Honest,
    /// Lies in well-formed messages.
    Liar(Misbehave),
}

impl Role {
    /// 2–3 serving peers, at least one honest.
    pub(super) fn draw(rng: &mut StdRng) -> Vec<Role> {
        let n = rng.gen_range(2..=3);
        let liars = rng.gen_range(0..n);
        // Lies in what is served, and games with time (a staller that sends junk blocks, `notfound` for
        // everything). Not an empty `headers` answer: a requester whose every circuit says "nothing new" cannot
        // tell (SPEC open issue 26d).
        let lies =
            [Misbehave::BadMerkle, Misbehave::BadPow, Misbehave::WrongBlock, Misbehave::Stall, Misbehave::NotFound];
        (0..n).map(|i| if i < liars { Role::Liar(lies[rng.gen_range(0..lies.len())]) } else { Role::Honest }).collect()
    }
}

/// The chain's name (`--serve regtest`).
pub(super) fn chain_id() -> ChainId {
    ChainId::new(&ChainParams::regtest().name).expect("regtest is a valid chain name")
}

/// The service a chain-serving peer runs (a fresh copy of the chain at each start).
pub(super) fn service(reference: &Reference, role: Role) -> Arc<dyn Service> {
    let misbehave = match role {
        Role::Honest => None,
        Role::Liar(m) => Some(m),
    };
    Arc::new(ChainService::new(reference.store()).with_misbehave(misbehave))
}

/// A sync (or a lying conversation) under way.
pub(super) struct Running {
    peer: usize,
    what: &'static str,
    started: Instant,
    task: JoinHandle<()>,
}

/// The syncs (and lying conversations) under way, by token.
pub(super) type Syncs = Arc<Mutex<BTreeMap<u64, Running>>>;

/// Registers a lying conversation of peer `i`: ended if the peer is killed, bounded like a sync.
pub(super) fn register(tasks: &Syncs, token: u64, i: usize, task: JoinHandle<()>) {
    tasks.lock().unwrap().insert(token, Running { peer: i, what: "lying requester", started: Instant::now(), task });
}

/// Starts a sync from peer `i` (alive, honest) over `relays` relays.
pub(super) fn start_sync(w: &World, i: usize, token: u64, relays: u8) {
    let Some(node) = w.peers[i].node.clone() else { return };
    let (net, shared, start, reference, syncs) =
        (w.net.clone(), w.shared.clone(), w.start, w.chain.clone(), w.syncs.clone());
    w.record(format_args!("chain sync token={token} from peer {i} over {relays} relays"));
    let task_syncs = syncs.clone();
    let task = tokio::spawn(async move {
        let store = chain::shared(ChainStore::new(ChainParams::regtest()).expect("a regtest store"));
        let source = anomos::cmd::fetch::circuit_source(node, chain_id(), relays);
        let opts = SyncOptions { circuits: 2, ..Default::default() };
        let (mut lies, mut replaced) = (0u64, 0u64);
        let on_event = |e: SyncEvent| match e {
            SyncEvent::CircuitFailed { circuit, error, misbehaving } => {
                net.record(format_args!(
                    "chain sync token={token}: circuit {circuit} failed (misbehaving={misbehaving}): {}",
                    error.chars().take(80).collect::<String>()
                ));
                lies += u64::from(misbehaving);
            }
            SyncEvent::CircuitAdded { .. } => replaced += 1,
            _ => {}
        };
        let r = chain::run_sync(Vec::new(), &ChainParams::regtest(), &store, &opts, Some(source), on_event).await;
        match r.map_err(|e| e.to_string()).and_then(|_| reference.check(&store)) {
            Ok(()) => {
                net.record(format_args!("chain sync token={token} from peer {i} complete ({replaced} circuits)"));
                shared.count("chain syncs complete");
                for _ in 0..lies {
                    shared.count("chain lies caught");
                }
            }
            Err(e) => shared.fail(start, format!("chain sync token={token} from peer {i}: {e}")),
        }
        task_syncs.lock().unwrap().remove(&token);
    });
    syncs.lock().unwrap().insert(token, Running { peer: i, what: "chain sync", started: Instant::now(), task });
}

/// Peer `i` was killed: its syncs end with it.
pub(super) fn abandon(w: &World, i: usize) {
    let mut syncs = w.syncs.lock().unwrap();
    syncs.retain(|token, r| {
        if r.peer != i {
            return true;
        }
        r.task.abort();
        w.net.record(format_args!("{} token={token} abandoned: peer {i} killed", r.what));
        w.shared.count("chain tasks abandoned (peer killed)");
        false
    });
}

/// Honest peers that may sync: alive, not serving the chain, not syncing already.
fn candidates(w: &World) -> Vec<usize> {
    let busy: Vec<usize> = w.syncs.lock().unwrap().values().map(|r| r.peer).collect();
    (0..w.peers.len())
        .filter(|&i| !w.peers[i].hostile && w.peers[i].chain.is_none() && w.alive(i) && !busy.contains(&i))
        .collect()
}

/// Starts syncs (and, one time in three, lying conversations) from random honest peers until `until`.
pub(super) async fn workload(world: Arc<tokio::sync::Mutex<World>>, mut rng: StdRng, until: Instant) {
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(3_000..25_000))).await;
        let w = world.lock().await;
        let c = candidates(&w);
        if c.is_empty() {
            continue;
        }
        let i = c[rng.gen_range(0..c.len())];
        if rng.gen_range(0..3) == 0 {
            super::liar::start(&w, i, rng.next_u64(), StdRng::seed_from_u64(rng.next_u64()));
        } else {
            start_sync(&w, i, rng.next_u64(), rng.gen_range(1..=3));
        }
    }
}

/// When the network heals: one more sync, so every run checks at least one.
pub(super) fn start_one(w: &World, rng: &mut StdRng) {
    let c = candidates(w);
    if !c.is_empty() {
        start_sync(w, c[rng.gen_range(0..c.len())], rng.next_u64(), rng.gen_range(1..=3));
    }
}

/// Every sync must be done within [`SYNC_BOUND`] of `healed`.
pub(super) async fn wait_all(world: Arc<tokio::sync::Mutex<World>>, healed: Instant) {
    loop {
        {
            let w = world.lock().await;
            let syncs = w.syncs.lock().unwrap();
            if syncs.is_empty() || w.shared.failed() {
                return;
            }
            if Instant::now() >= healed + SYNC_BOUND {
                let late: Vec<String> = syncs
                    .iter()
                    .map(|(t, r)| {
                        let at = (r.started - w.start).as_secs_f64();
                        format!("{} token={t} from peer {} (started at {at:.0} s)", r.what, r.peer)
                    })
                    .collect();
                drop(syncs);
                let overlay = super::checks::overlay(&w);
                w.fail(format!(
                    "not done {SYNC_BOUND:?} after the network healed: {}\n  overlay: {overlay}",
                    late.join(", ")
                ));
                return;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Ends the syncs still running (the run is over).
pub(super) fn stop(w: &World) {
    for r in w.syncs.lock().unwrap().values() {
        r.task.abort();
    }
}
