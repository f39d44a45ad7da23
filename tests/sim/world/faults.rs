//! The faults a run suffers, drawn from its seed: connections cut, partitions and heals, honest peers and the
//! tracker killed and restarted later with their data directories.

use super::*;

/// Faults drawn from the seed until `until`.
pub(super) async fn faults(world: Arc<tokio::sync::Mutex<World>>, mut rng: StdRng, until: Instant) {
    let mut restarts: Vec<(Instant, Option<usize>)> = Vec::new();
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(500..6000))).await;
        let mut w = world.lock().await;
        // Restarts that are due.
        let now = Instant::now();
        let due: Vec<Option<usize>> = restarts.iter().filter(|r| r.0 <= now).map(|r| r.1).collect();
        restarts.retain(|r| r.0 > now);
        for r in due {
            match r {
                Some(i) => {
                    w.record(format_args!("fault: restart peer {i}"));
                    w.start_peer(i, true).await;
                    w.shared.count("peer restarts");
                }
                None => {
                    w.record(format_args!("fault: restart tracker"));
                    w.start_tracker().await;
                    w.shared.count("tracker restarts");
                }
            }
        }
        let n = w.peers.len();
        match rng.gen_range(0..100) {
            0..=29 => {
                if let Some((a, b)) = w.net.cut_one(rng.gen()) {
                    w.record(format_args!("fault: cut {a}-{b}"));
                    w.shared.count("connections cut");
                }
            }
            30..=49 => {
                let a = w.peers[rng.gen_range(0..n)].host;
                let b = if rng.gen_bool(0.2) { w.tracker_host } else { w.peers[rng.gen_range(0..n)].host };
                if a != b {
                    w.net.partition(a, b);
                    w.shared.count("partitions");
                }
            }
            50..=64 => {
                w.net.heal();
            }
            65..=84 => {
                // Kill an honest peer (keep most of the overlay up) and restart it later with its data dir.
                let alive: Vec<usize> = (0..n).filter(|&i| w.alive(i) && !w.peers[i].hostile).collect();
                let dead = (0..n).filter(|&i| !w.net.is_alive(w.peers[i].host)).count();
                if alive.len() > 4 && dead < n / 4 {
                    let i = alive[rng.gen_range(0..alive.len())];
                    w.record(format_args!("fault: kill peer {i}"));
                    w.net.kill(w.peers[i].host);
                    w.peers[i].node = None;
                    chain::abandon(&w, i);
                    w.shared.count("peer kills");
                    restarts.push((now + Duration::from_millis(rng.gen_range(500..30_000)), Some(i)));
                }
            }
            85..=89 if w.net.is_alive(w.tracker_host) && !restarts.iter().any(|r| r.1.is_none()) => {
                w.record(format_args!("fault: kill tracker"));
                w.net.kill(w.tracker_host);
                if let Some(t) = &w.tracker_task {
                    t.abort();
                }
                w.shared.count("tracker kills");
                restarts.push((now + Duration::from_millis(rng.gen_range(1000..20_000)), None));
            }
            _ => {}
        }
    }
}
