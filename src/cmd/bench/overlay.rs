//! The overlays of `anomos bench`: relay processes, in-process requester and targets, and the bulk service.

use super::*;

/// Which optional flags this executable's subcommands know (they are passed only if present).
pub(super) async fn help_text(sub: &str) -> String {
    let Ok(exe) = std::env::current_exe() else { return String::new() };
    match Command::new(exe).args([sub, "--help"]).stdin(Stdio::null()).output().await {
        Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
        Err(_) => String::new(),
    }
}

/// Sends `count` bytes of records on request: a message `bulk <bytes> <chunk>` is answered with `bytes`
/// bytes in messages of `chunk` bytes. Any other message is ignored; the circuit is held until it ends.
pub(super) struct Bulk;

impl Service for Bulk {
    fn accept(&self, mut stream: CircuitStream) {
        tokio::spawn(async move {
            while let Ok(req) = stream.recv().await {
                let Some((total, chunk)) = parse_bulk(&req) else { continue };
                let sender = stream.sender();
                let mut left = total;
                while left > 0 {
                    let n = left.min(chunk as u64) as usize;
                    if sender.send(vec![0xa5u8; n]).await.is_err() {
                        return;
                    }
                    left -= n as u64;
                }
            }
        });
    }
}

pub(super) fn parse_bulk(req: &[u8]) -> Option<(u64, usize)> {
    let s = std::str::from_utf8(req).ok()?;
    let mut w = s.split_whitespace();
    if w.next()? != "bulk" {
        return None;
    }
    let total: u64 = w.next()?.parse().ok()?;
    let chunk: usize = w.next()?.parse().ok()?;
    (1..=MAX_MESSAGE).contains(&chunk).then_some((total, chunk))
}

/// Receives `bytes` bytes after asking the bulk target for them; returns the time from the request to the
/// last byte.
pub(super) async fn transfer(s: &mut CircuitStream, bytes: u64, chunk: usize) -> Result<Duration, PeerError> {
    let t = Instant::now();
    s.send(format!("bulk {bytes} {chunk}").into_bytes()).await?;
    let mut got = 0u64;
    while got < bytes {
        got += s.recv().await?.len() as u64;
    }
    Ok(t.elapsed())
}

/// A tracker and relay processes, and nodes in this process, on one overlay.
pub(super) struct Overlay {
    pub(super) tracker: SocketAddr,
    pub(super) tracker_key: PublicKey,
    pub(super) relays: Vec<Proc>,
    pub(super) _tracker: Proc,
    pub(super) nodes: Vec<Arc<Node>>,
    /// Worker threads each relay process was started with (0: one per core).
    pub(super) relay_threads: usize,
}

/// What one in-process node serves.
pub(super) struct NodeSpec {
    pub(super) serve: Option<(ChainId, Arc<dyn Service>)>,
}

impl Overlay {
    /// Starts a tracker (degree: a complete graph of all peers), `relays` relay processes and the in-process
    /// nodes, and waits until every in-process node has a link to every other peer.
    pub(super) async fn start(
        name: &str,
        root: &Path,
        relays: usize,
        specs: Vec<NodeSpec>,
        tune: Tune,
        quiet: bool,
    ) -> Result<Overlay, PeerError> {
        let window = tune.window;
        // Every process of the overlay shares this machine's cores; a relay with more worker threads than its
        // share only adds cross-thread wake-ups (docs/PERFORMANCE.md, revision 5).
        let relay_threads = tune.relay_threads.unwrap_or((cores() / (relays + 1)).max(1));
        let dir = root.join(name);
        crate::cmd::ensure_private_dir(&dir)?;
        let d = |n: &str| dir.join(n).display().to_string();
        let peers = relays + specs.len();
        let thelp = help_text("tracker").await;
        let mut targs: Vec<String> = [
            "tracker",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &d("tracker"),
            "--allow-same-ip",
            "--interval",
            "3",
            "--neighbors",
            &(peers - 1).clamp(1, 30).to_string(),
        ]
        .map(String::from)
        .to_vec();
        // Circuit builds and grant prefetches open many tracker sessions from 127.0.0.1.
        for (flag, v) in [("--hello-rate", "1000000"), ("--hello-burst", "1000000"), ("--max-sessions-per-ip", "4096")]
        {
            if thelp.contains(flag) {
                targs.extend([flag.to_string(), v.to_string()]);
            }
        }
        let (tracker, taddr, tfp) = spawn_ready("tracker", &targs, &dir.join("tracker.log")).await?;
        progress(quiet, format!("{name}: tracker {taddr}"));
        let tracker_addr: SocketAddr = taddr.parse().map_err(|e| PeerError::Process(format!("tracker addr: {e}")))?;
        let phelp = help_text("peer").await;
        let mut starts = Vec::new();
        for i in 0..relays {
            let rn = format!("relay{i}");
            let mut a: Vec<String> = [
                "--log-level",
                "warn",
                "peer",
                "--listen",
                "127.0.0.1:0",
                "--tracker",
                &taddr,
                "--tracker-fp",
                &tfp,
                "--data-dir",
                &d(&rn),
                "--max-circuits",
                "100000",
                "--stats-interval",
                "0",
            ]
            .map(String::from)
            .to_vec();
            if let Some(w) = window {
                a.extend(["--circuit-window".to_string(), w.to_string()]);
            }
            if phelp.contains("--threads") {
                a.extend(["--threads".to_string(), relay_threads.to_string()]);
            }
            // The measured relay must not refuse OPENs by rate, or hold back the single-host overlay.
            for (flag, v) in [
                ("--open-rate", "1000000"),
                ("--open-burst", "1000000"),
                ("--max-conns-per-ip", "4096"),
                ("--max-conns", "8192"),
            ] {
                if phelp.contains(flag) {
                    a.extend([flag.to_string(), v.to_string()]);
                }
            }
            starts.push((rn, a));
        }
        let spawned = crate::node::futures_join_all(starts.iter().map(|(n, a)| {
            let log = dir.join(format!("{n}.log"));
            async move { spawn_ready(n, a, &log).await }
        }))
        .await;
        let mut procs = Vec::new();
        for r in spawned {
            procs.push(r?.0);
        }
        let pinned = Fingerprint::from_hex(&tfp).map_err(|e| PeerError::Process(format!("tracker fp: {e}")))?;
        let tracker_key = fetch_tracker_key(tracker_addr, &pinned).await?;
        // Identities for the in-process nodes, generated in parallel.
        let ids = crate::node::futures_join_all(
            (0..specs.len()).map(|_| tokio::task::spawn_blocking(|| Identity::generate(&mut rand::rngs::OsRng, 2048))),
        )
        .await;
        let mut nodes = Vec::new();
        for (i, (spec, id)) in specs.into_iter().zip(ids).enumerate() {
            let id = id.map_err(|e| PeerError::Internal(e.to_string()))??;
            // A node keeps state in its data dir (the replay cache, saved every 15 s).
            let data_dir = dir.join(format!("node{i}"));
            crate::cmd::ensure_private_dir(&data_dir)?;
            let mut cfg = PeerConfig::new(
                "127.0.0.1:0".parse().map_err(|e| PeerError::Internal(format!("{e}")))?,
                tracker_addr,
                tfp.clone(),
                data_dir,
            );
            cfg.max_circuits = 100_000;
            cfg.open_rate = 1_000_000;
            cfg.open_burst = 1_000_000;
            cfg.max_conns = 8192;
            cfg.max_conns_per_ip = 4096;
            cfg.stats_interval = Duration::ZERO;
            if let Some(w) = window {
                cfg.circuit_window = w;
            }
            let service = match spec.serve {
                Some((chain, svc)) => {
                    cfg.serve = vec![chain];
                    Some(svc)
                }
                None => None,
            };
            let (node, listener) = Node::bind(cfg, id, tracker_key.clone(), service).await?;
            node.start(listener);
            nodes.push(node);
        }
        let started = Instant::now();
        loop {
            let ready = nodes.iter().all(|n| n.neighbor_count() >= peers - 1 && n.link_count() >= peers - 1);
            if ready {
                break;
            }
            if started.elapsed() > Duration::from_secs(60) {
                progress(quiet, format!("{name}: not every link is up after 60 s; going on"));
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        progress(
            quiet,
            format!(
                "{name}: {relays} relay processes and {} nodes up in {:.1}s",
                nodes.len(),
                started.elapsed().as_secs_f64()
            ),
        );
        Ok(Overlay { tracker: tracker_addr, tracker_key, relays: procs, _tracker: tracker, nodes, relay_threads })
    }

    pub(super) fn relay_pids(&self) -> Vec<u32> {
        self.relays.iter().map(Proc::pid).collect()
    }

    pub(super) fn relay_cpu(&self) -> f64 {
        self.relay_pids().into_iter().filter_map(cpu_secs).sum()
    }
}

/// Opens `count` circuits (to distinct targets) of `relays` relays for `chain`, retrying for up to 60 s
/// (links between relay processes may still be coming up).
pub(super) async fn open_retry(
    node: &Arc<Node>,
    chain: &str,
    relays: u8,
    count: u8,
) -> Result<Vec<CircuitStream>, PeerError> {
    let chain = ChainId::new(chain).map_err(|e| PeerError::Internal(e.to_string()))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let req = CircuitRequest { chain: chain.clone(), count, relays };
        match node.request_circuits(req).await {
            Ok(v) if v.len() == usize::from(count) => return Ok(v),
            Ok(_) | Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(300)).await,
            Ok(v) => {
                return Err(PeerError::Process(format!(
                    "only {} of {count} circuits with {relays} relays opened",
                    v.len()
                )))
            }
            Err(e) => return Err(e),
        }
    }
}
