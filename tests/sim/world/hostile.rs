//! Hostile peers: real nodes (valid keys, admitted by the tracker, real links) whose links the driver makes carry
//! whatever cells it likes (OPENs with TCs it builds along paths of its choosing, cells on any id, replays, floods,
//! lying reports, and tracker requests of every kind: circuit-request bursts with counts and lengths in and out of
//! range, announces of foreign or dead addresses, oversized chain and family lists, ticket requests, a second Hello).

use super::checks::graph;
use super::*;
use anomos_proto::tracker::ToTracker;

fn secret(rng: &mut StdRng) -> Secret {
    let mut s = [0u8; 32];
    rng.fill_bytes(&mut s);
    Secret(s)
}

/// A TC along `hops` (key of each hop, the edge it is entered by); the last hop is a target of `chain`.
fn build_tc(
    rng: &mut StdRng,
    hops: &[(PublicKey, NeighborId)],
    chain: &str,
    expires: u64,
) -> Option<Box<[u8; tc::TC_LEN]>> {
    let e2e = secret(rng);
    let specs: Vec<HopSpec> = hops
        .iter()
        .enumerate()
        .map(|(i, (key, prev))| {
            let mut tag = [0u8; 16];
            rng.fill_bytes(&mut tag);
            let kind = match hops.get(i + 1) {
                Some((_, next)) => LayerKind::Relay { next: *next },
                None => LayerKind::Target {
                    chain: ChainId::new(chain).unwrap_or_else(|_| ChainId::new(CHAIN).unwrap()),
                    session: {
                        let mut s = [0u8; 16];
                        rng.fill_bytes(&mut s);
                        s
                    },
                    e2e_secret: e2e.clone(),
                },
            };
            HopSpec {
                key: key.clone(),
                layer: Layer { prev: *prev, kind, hop_secret: secret(rng), expires, replay_tag: tag },
            }
        })
        .collect();
    let _ = HopLayer::new(&e2e);
    tc::build(&specs, &mut rand::rngs::OsRng).ok()
}

pub(super) async fn hostile_driver(world: Arc<tokio::sync::Mutex<World>>, mut rng: StdRng, until: Instant) {
    let mut sent_opens: Vec<Cell> = Vec::new();
    let mut next_id: CircId = 1;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(50..1500))).await;
        let w = world.lock().await;
        let bad: Vec<usize> = (0..w.peers.len()).filter(|&i| w.peers[i].hostile && w.alive(i)).collect();
        if bad.is_empty() {
            return;
        }
        let h = bad[rng.gen_range(0..bad.len())];
        let g = graph(&w);
        let Some(hnode) = w.peers[h].node.clone() else { continue };
        let mine = &g[h];
        if mine.is_empty() {
            continue;
        }
        let (r, rkey, e) = mine[rng.gen_range(0..mine.len())].clone();
        let Some(link) = hnode.link(e) else { continue };
        let ours = |id: CircId| if link.dialer { id | DIALER_CIRC_BIT } else { id & !DIALER_CIRC_BIT };
        next_id = next_id.wrapping_add(1).max(1) & !DIALER_CIRC_BIT;
        let id = ours(next_id);
        let now = anomos_net::rt::unix_now();
        let action = rng.gen_range(0..100);
        let mut cells: Vec<Cell> = Vec::new();
        let what: String;
        match action {
            0..=24 => {
                // The self-loop: a relay layer at r whose next hop is the edge the OPEN comes in on (next == prev).
                let hops = [(rkey.clone(), e), (keys::pool()[w.peers[h].key].public().clone(), e)];
                if let Some(tc) = build_tc(&mut rng, &hops, CHAIN, now + 600) {
                    cells.push(Cell::open(id, &tc));
                }
                what = format!("OPEN loop next==prev at peer {r}");
            }
            25..=49 => {
                // A path of our choosing through the real graph: a random walk that may revisit peers (loops
                // through r and back), may take an edge that does not exist, and may end anywhere.
                let mut hops = vec![(rkey.clone(), e)];
                let mut at = r;
                let len = rng.gen_range(1..=5);
                for _ in 0..len {
                    if rng.gen_bool(0.15) {
                        hops.push((rkey.clone(), NeighborId(rng.next_u64())));
                        break;
                    }
                    let nb = &g[at];
                    if nb.is_empty() {
                        break;
                    }
                    let (j, k, nid) = nb[rng.gen_range(0..nb.len())].clone();
                    hops.push((k, nid));
                    at = j;
                }
                let chain = if rng.gen_bool(0.8) { CHAIN } else { "nochain" };
                let expires = if rng.gen_bool(0.9) { now + 600 } else { now.saturating_sub(rng.gen_range(0..200)) };
                if let Some(tc) = build_tc(&mut rng, &hops, chain, expires) {
                    cells.push(Cell::open(id, &tc));
                    // Pipelined DATA behind the OPEN.
                    for _ in 0..rng.gen_range(0..20) {
                        cells.push(random_cell(&mut rng, id, Command::Data));
                    }
                }
                what = format!("OPEN path of {} hops from peer {r}", hops.len());
            }
            50..=69 => {
                // DATA/SENDME/BREAK/CONFIRM/DENY on ids of either half, in whatever state they are.
                let n = rng.gen_range(1..40);
                for _ in 0..n {
                    let cid = if rng.gen_bool(0.5) {
                        rng.gen_range(1..64) | (rng.gen::<u32>() & DIALER_CIRC_BIT)
                    } else {
                        id
                    };
                    let cmd = [Command::Data, Command::Sendme, Command::Break, Command::Confirm, Command::Deny]
                        [rng.gen_range(0..5)];
                    cells.push(random_cell(&mut rng, cid, cmd));
                }
                what = format!("{n} random control/DATA cells to peer {r}");
            }
            70..=79 => {
                // Replays of OPENs sent before, here or on another link.
                if sent_opens.is_empty() {
                    continue;
                }
                let c = sent_opens[rng.gen_range(0..sent_opens.len())].clone();
                let tcb = c.open_tc().unwrap();
                cells.push(Cell::open(id, &tcb));
                what = format!("replayed OPEN to peer {r}");
            }
            80..=89 => {
                // A flood of OPENs with junk TCs or DATA on one id, within and beyond the rate limits.
                let n = rng.gen_range(50..800);
                let junk = rng.gen_bool(0.5);
                for k in 0..n {
                    if junk {
                        let mut tcb = [0u8; tc::TC_LEN];
                        rng.fill_bytes(&mut tcb[..64]);
                        next_id = next_id.wrapping_add(1).max(1) & !DIALER_CIRC_BIT;
                        cells.push(Cell::open(ours(next_id), &tcb));
                    } else {
                        cells.push(random_cell(&mut rng, id, if k % 7 == 0 { Command::Sendme } else { Command::Data }));
                    }
                }
                what = format!("flood of {n} cells ({}) to peer {r}", if junk { "OPENs" } else { "DATA/SENDME" });
            }
            95..=99 => {
                // Requests of every kind to the tracker, over a session of the hostile peer's own (in a task of
                // its own: the tracker may be down, and the harness must not wait on it).
                let others: Vec<SocketAddr> = w.peers.iter().map(|p| p.addr).collect();
                let client = anomos::tracker_client::TrackerClient::new(
                    w.net.transport(w.peers[h].host),
                    w.tracker_addr,
                    keys::pool()[0].public().clone(),
                    Arc::new(keys::pool()[w.peers[h].key].clone()),
                );
                let (msgs, label) = tracker_requests(&mut rng, w.peers[h].addr, &others);
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(60), async {
                        for m in &msgs {
                            let _ = client.request(m).await;
                        }
                    })
                    .await;
                });
                what = format!("tracker requests: {label}");
            }
            _ => {
                // Lying failure reports to the tracker.
                let kind = match rng.gen_range(0..4) {
                    0 => FailureKind::NeighborUnreachable,
                    1 => FailureKind::CircuitDenied(rng.gen()),
                    2 => FailureKind::CircuitBroken(rng.gen()),
                    _ => FailureKind::Misbehaving,
                };
                let nb = if rng.gen_bool(0.7) { Some(e) } else { Some(NeighborId(rng.next_u64())) };
                hnode.report(FailureReport {
                    kind,
                    neighbor: nb,
                    circuit: rng.gen_bool(0.5).then(|| rng.next_u64()),
                    hop_tag: None,
                });
                what = format!("lying report about peer {r}");
            }
        }
        for c in &cells {
            if c.command == Command::Open {
                sent_opens.push(c.clone());
                if sent_opens.len() > 64 {
                    sent_opens.remove(0);
                }
            }
            let _ = link.writer.push_control(c.clone());
        }
        w.record(format_args!("hostile {h}: {what}"));
        w.shared.count("hostile actions");
    }
}

/// One hostile peer's burst of tracker requests (listening at `me`; `others` are every peer's addresses).
fn tracker_requests(rng: &mut StdRng, me: SocketAddr, others: &[SocketAddr]) -> (Vec<ToTracker>, &'static str) {
    use anomos_proto::tracker::{Announce, MAX_CHAINS, MAX_FAMILY};
    let chain = |rng: &mut StdRng| ChainId::new(if rng.gen_bool(0.7) { CHAIN } else { "nochain" }).unwrap();
    match rng.gen_range(0..6) {
        0 => {
            let n = rng.gen_range(1..40);
            let reqs = (0..n)
                .map(|_| {
                    ToTracker::RequestCircuits(CircuitRequest {
                        chain: chain(rng),
                        count: rng.gen_range(0..=20),
                        relays: rng.gen_range(0..=8),
                    })
                })
                .collect();
            (reqs, "circuit requests, in and out of range")
        }
        1 => {
            let listen = others[rng.gen_range(0..others.len())];
            (
                vec![ToTracker::Announce(Announce { listen, chains: vec![chain(rng)], family: vec![] })],
                "announce of another peer's address",
            )
        }
        2 => {
            let listen = SocketAddr::new(me.ip(), me.port().wrapping_add(rng.gen_range(1..100)));
            (vec![ToTracker::Announce(Announce { listen, chains: vec![], family: vec![] })], "announce of a dead port")
        }
        3 => {
            let chains = (0..rng.gen_range(0..=MAX_CHAINS + 4))
                .map(|i| ChainId::new(&format!("c{i}")).unwrap_or_else(|_| chain(rng)))
                .collect();
            let family = (0..rng.gen_range(0..=MAX_FAMILY + 4))
                .map(|_| keys::pool()[rng.gen_range(0..keys::POOL)].fingerprint())
                .collect();
            (
                vec![ToTracker::Announce(Announce { listen: me, chains, family })],
                "announce with long chain and family lists",
            )
        }
        4 => {
            let hello = ToTracker::Hello { public_key: vec![0x30; rng.gen_range(0..600)], signature: vec![7; 256] };
            (
                vec![ToTracker::Resumable, ToTracker::Resumable, hello, ToTracker::Resumable],
                "tickets and a second Hello",
            )
        }
        _ => {
            let reps = (0..rng.gen_range(20..60))
                .map(|_| {
                    ToTracker::Report(FailureReport {
                        kind: FailureKind::CircuitDenied(rng.gen()),
                        neighbor: None,
                        circuit: Some(rng.next_u64()),
                        hop_tag: Some([rng.gen(); 16]),
                    })
                })
                .collect();
            (reps, "a burst of reports on unknown circuits")
        }
    }
}

fn random_cell(rng: &mut StdRng, id: CircId, cmd: Command) -> Cell {
    match cmd {
        Command::Sendme => Cell::sendme(id, if rng.gen_bool(0.8) { rng.gen_range(1..64) } else { rng.gen() }),
        Command::Break => Cell::brk(id, BreakReason::from_code(rng.gen_range(0..12)), None),
        Command::Deny => Cell::deny(id, DenyReason::from_code(rng.gen_range(0..12)), None),
        _ => {
            let mut c = Cell::new(id, cmd);
            rng.fill_bytes(&mut c.payload[..]);
            c
        }
    }
}
