//! Overlay B of `anomos bench`: opens per second and memory per idle circuit at one relay.

use super::*;

/// Holds every circuit opened to it until it ends.
pub(super) struct Hold;

impl Service for Hold {
    fn accept(&self, mut stream: CircuitStream) {
        tokio::spawn(async move { while stream.recv().await.is_ok() {} });
    }
}

/// Fetches `n` grants for `chain` with one relay, over a few tracker sessions in parallel.
pub(super) async fn prefetch_grants(o: &Overlay, node: &Arc<Node>, n: usize) -> Result<Vec<CircuitGrant>, PeerError> {
    let chain = ChainId::new("hold").map_err(|e| PeerError::Internal(e.to_string()))?;
    let sessions = 4usize;
    let tasks = (0..sessions).map(|i| {
        let (addr, key, id, chain) = (o.tracker, o.tracker_key.clone(), node.identity.clone(), chain.clone());
        let want = n / sessions + usize::from(i < n % sessions);
        async move {
            let mut s = TrackerSession::connect(addr, &key, &id).await?;
            let mut out = Vec::with_capacity(want);
            let mut misses = 0;
            while out.len() < want {
                let req = ToTracker::RequestCircuits(CircuitRequest { chain: chain.clone(), count: 1, relays: 1 });
                match s.request(&req).await {
                    Ok(FromTracker::Circuits(c)) if !c.circuits.is_empty() => out.extend(c.circuits),
                    _ => {
                        misses += 1;
                        if misses > 50 {
                            return Err(PeerError::Tracker("no grants".into()));
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        s = TrackerSession::connect(addr, &key, &id).await?;
                    }
                }
            }
            Ok::<_, PeerError>(out)
        }
    });
    let mut all = Vec::with_capacity(n);
    for r in crate::node::futures_join_all(tasks).await {
        all.extend(r?);
    }
    Ok(all)
}

/// Opens a circuit for every grant, `concurrency` at a time; returns the streams that opened.
pub(super) async fn open_many(node: &Arc<Node>, grants: Vec<CircuitGrant>, concurrency: usize) -> Vec<CircuitStream> {
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    for g in grants {
        let Ok(permit) = sem.clone().acquire_owned().await else { break };
        let node = node.clone();
        tasks.spawn(async move {
            let r = node.open_circuit(&g).await;
            drop(permit);
            r.ok()
        });
    }
    let mut out = Vec::new();
    while let Some(r) = tasks.join_next().await {
        if let Ok(Some(s)) = r {
            out.push(s);
        }
    }
    out
}

/// One run of overlay B (a fresh relay process, so that nothing from an earlier run is in its memory).
pub(super) async fn opens_run(root: &Path, plan: &Plan, run: usize, quiet: bool) -> Result<Report, PeerError> {
    let mut rep = Report::default();
    let budget = plan.crypto_time * 2;
    let (rsa, peel) = tokio::task::spawn_blocking(move || raw_rsa(budget))
        .await
        .map_err(|e| PeerError::Internal(e.to_string()))??;
    progress(quiet, format!("RSA-OAEP-2048: {rsa:.0} decrypts/s, {peel:.0} TC peels/s per core"));
    rep.add("rsa_decrypts_per_s", "RSA-OAEP-2048 decrypts/s, per core", "/s", None, rsa);
    rep.add("tc_peels_per_s", "TC peels/s, per core", "/s", None, peel);
    let hold = ChainId::new("hold").map_err(|e| PeerError::Internal(e.to_string()))?;
    let specs = vec![NodeSpec { serve: None }, NodeSpec { serve: Some((hold, Arc::new(Hold) as Arc<dyn Service>)) }];
    let o = Overlay::start(&format!("overlay-b{}", run + 1), root, 1, specs, plan.tune, quiet).await?;
    let node = first_node(&o)?.clone();
    let relay =
        o.relay_pids().first().copied().ok_or_else(|| PeerError::Internal("overlay started without relays".into()))?;
    // Wait until a circuit opens (the relay's link to the target is up too).
    let deadline = Instant::now() + Duration::from_secs(30);
    while open_many(&node, prefetch_grants(&o, &node, 1).await?, 1).await.is_empty() {
        if Instant::now() > deadline {
            return Err(PeerError::Process("no circuit opens through the relay".into()));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let n = plan.idle_circuits;
    let mut grants = prefetch_grants(&o, &node, plan.warm_circuits + n).await?;
    let main = grants.split_off(plan.warm_circuits);
    // Warm-up: the relay's blocking threads and allocator arenas reach their working size; then wait until
    // the warm-up circuits' open timers and the idle blocking threads are gone.
    drop(open_many(&node, grants, plan.concurrency).await);
    tokio::time::sleep(plan.settle).await;
    let rss0 = rss_bytes(relay).unwrap_or(0);
    let cpu0 = cpu_secs(relay).unwrap_or(0.0);
    let t = Instant::now();
    let held = open_many(&node, main, plan.concurrency).await;
    let secs = t.elapsed().as_secs_f64();
    let cpu = cpu_secs(relay).unwrap_or(0.0) - cpu0;
    let opened = held.len();
    tokio::time::sleep(plan.settle).await;
    let rss1 = rss_bytes(relay).unwrap_or(0);
    let opens = opened as f64 / secs;
    let per_circ = (rss1 as f64 - rss0 as f64) / opened.max(1) as f64;
    progress(
        quiet,
        format!(
            "opens run {}: {opened}/{n} opened, {opens:.0}/s, relay CPU {:.2} ms/open ({:.0} % of a core); \
             RSS {:.1} → {:.1} MiB = {:.0} B per idle circuit",
            run + 1,
            cpu * 1e3 / opened.max(1) as f64,
            100.0 * cpu / secs,
            rss0 as f64 / 1048576.0,
            rss1 as f64 / 1048576.0,
            per_circ
        ),
    );
    rep.add("opens_per_s", "circuit opens/s at one relay", "/s", at_least(400.0), opens);
    rep.add("opens_pct_of_rsa", "  … of its RSA decrypt rate", "%", at_least(75.0), 100.0 * opens / rsa);
    rep.add("relay_cpu_ms_per_open", "  relay CPU per open", "ms", None, cpu * 1e3 / opened.max(1) as f64);
    // The relay's own efficiency, free of the load generator (the requester and the target, which needs an RSA
    // decryption per circuit too, share the 2 cores): opens per CPU-second the relay spent, against RSA
    // decryptions per CPU-second of one thread (the relay peels each OPEN on one blocking thread).
    let per_cpu = opened as f64 / cpu.max(1e-9);
    rep.add("relay_opens_per_cpu_s", "  relay opens per relay CPU-second", "/s", None, per_cpu);
    rep.add("relay_opens_per_cpu_pct_of_rsa", "  … of the RSA decrypt rate", "%", None, 100.0 * per_cpu / rsa);
    rep.add("relay_cpu_pct_opening", "  relay CPU while opening", "% core", None, 100.0 * cpu / secs);
    rep.add(
        "rss_per_idle_circuit_kib",
        &format!("RSS per idle circuit ({n} held)"),
        "KiB",
        at_most(4.0),
        per_circ / 1024.0,
    );
    if opened < n {
        rep.notes.push(format!("opens run {}: only {opened} of {n} circuits opened", run + 1));
    }
    drop(held);
    Ok(rep)
}
