//! The restart measurement (`--restart`): the tracker is stopped with SIGTERM, as a service manager does, and
//! started again on the same address and data directory while every simulated peer keeps running. Measured: how
//! long the stop and the start (loading the state database) take, when the first circuit is granted again
//! (requests from random joined peers every 50 ms, from the SIGTERM), and, once every peer has announced again,
//! how many of the neighbor-table entries (NeighborID and address) each peer had before the restart it still has.
//! Only tables answered after the last join count: a newcomer splits edges, so an older table may list an edge
//! the tracker had already removed before the restart (with intervals of 100 s at 100,000 peers, many would).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anomos_proto::ids::ChainId;
use rand::seq::SliceRandom;

use crate::peer::{Ctx, Peer};

/// Each joined peer's neighbor table (NeighborID, address), its announces so far and whether the table was
/// answered after the last join, by its address.
pub type Snapshot = HashMap<SocketAddr, (BTreeSet<(u64, SocketAddr)>, u64, bool)>;

/// What the restart showed.
pub struct Restarted {
    /// SIGTERM to exit.
    pub stop_s: f64,
    /// Start to the ready line (the state database loaded).
    pub start_s: f64,
    /// SIGTERM to the first circuit granted by the new process.
    pub grant_s: f64,
    /// Peers that announced again within the wait, of those joined.
    pub reannounced: usize,
    pub joined: usize,
    /// SIGTERM to the last of those re-announces.
    pub reannounce_s: f64,
    /// Neighbor-table entries before, of the peers that re-announced with a table answered after the last join,
    /// and of them the ones each still has; those peers.
    pub entries: usize,
    pub kept: usize,
    pub compared: usize,
    /// Failures between the SIGTERM and the end of the measurement, by kind (expected while the tracker is down).
    pub errors: BTreeMap<String, u64>,
}

impl Restarted {
    pub fn kept_pct(&self) -> f64 {
        100.0 * self.kept as f64 / self.entries.max(1) as f64
    }
}

/// Stops `pid` with SIGTERM and waits (at most 30 s) until `exited` says it is gone.
pub async fn stop(pid: u32, mut exited: impl FnMut() -> bool) -> Result<f64, String> {
    let t = Instant::now();
    let ok =
        std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status().map_err(|e| e.to_string())?;
    if !ok.success() {
        return Err(format!("kill -TERM {pid} failed"));
    }
    while !exited() {
        if t.elapsed() > Duration::from_secs(30) {
            return Err("the tracker did not exit within 30 s of SIGTERM".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(t.elapsed().as_secs_f64())
}

/// The tables of every joined peer now, how many announces each has made, and whether its table was answered
/// after the last join (`last_join_ms`).
pub fn snapshot(peers: &[Arc<Peer>], last_join_ms: u64) -> Snapshot {
    peers
        .iter()
        .filter(|p| p.joined.load(Ordering::Relaxed))
        .map(|p| {
            let table = p.table.lock().unwrap_or_else(|e| e.into_inner()).iter().copied().collect();
            let current = p.last_announce_ms.load(Ordering::Relaxed) > last_join_ms;
            (p.listen, (table, p.announces.load(Ordering::Relaxed), current))
        })
        .collect()
}

/// After the new process is up (`started`: SIGTERM time, `stop_s`, `start_s`): first grant, then re-announces
/// (waiting at most `wait`), then the comparison with `before`.
#[allow(clippy::too_many_arguments)]
pub async fn measure(
    ctx: &Arc<Ctx>,
    peers: &[Arc<Peer>],
    before: &Snapshot,
    sigterm: Instant,
    stop_s: f64,
    start_s: f64,
    chain: ChainId,
    relays: u8,
    wait: Duration,
) -> Restarted {
    let live: Vec<Arc<Peer>> = peers.iter().filter(|p| before.contains_key(&p.listen)).cloned().collect();
    let mut grant_s = f64::NAN;
    while sigterm.elapsed() < Duration::from_secs(120) {
        let Some(p) = live.choose(&mut rand::thread_rng()) else { break };
        if p.request_circuit(ctx, chain.clone(), relays).await {
            grant_s = sigterm.elapsed().as_secs_f64();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let again = || live.iter().filter(|p| p.announces.load(Ordering::Relaxed) > before[&p.listen].1).count();
    let mut last = sigterm;
    let mut seen = 0;
    while again() < live.len() && sigterm.elapsed() < wait {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = again();
        if now > seen {
            (seen, last) = (now, Instant::now());
        }
    }
    // Only peers that announced to the new process count: the others still hold the table from before.
    let (mut entries, mut kept, mut compared) = (0, 0, 0);
    for p in live.iter().filter(|p| p.announces.load(Ordering::Relaxed) > before[&p.listen].1) {
        let (table, _, current) = &before[&p.listen];
        if !current {
            continue;
        }
        compared += 1;
        let after: BTreeSet<(u64, SocketAddr)> =
            p.table.lock().unwrap_or_else(|e| e.into_inner()).iter().copied().collect();
        entries += table.len();
        kept += table.intersection(&after).count();
    }
    let from = sigterm.duration_since(ctx.start).as_secs_f32();
    Restarted {
        stop_s,
        start_s,
        grant_s,
        reannounced: again(),
        joined: live.len(),
        reannounce_s: last.duration_since(sigterm).as_secs_f64(),
        entries,
        kept,
        compared,
        errors: ctx.stats.errors(from, f32::MAX),
    }
}
