//! Overlay A and C figures of `anomos bench`: throughput, relay CPU, build latency, chain sync over circuits and over direct TCP.

use super::*;

pub(super) async fn bulk_figures(
    o: &Overlay,
    plan: &Plan,
    costs: &Costs,
    rep: &mut Report,
    quiet: bool,
) -> Result<(), PeerError> {
    let req = first_node(o)?;
    for relays in 1..=3u8 {
        let hops = usize::from(relays) + 1;
        let (bound, stage, with_tcp) = bounds(costs, hops, cores());
        rep.info(&format!("bound_crypto_mbps_{hops}hops"), bound / 1e6);
        rep.info(&format!("bound_stage_mbps_{hops}hops"), stage / 1e6);
        rep.info(&format!("bound_crypto_tcp_mbps_{hops}hops"), with_tcp / 1e6);
        for run in 0..plan.runs {
            let mut s = open_retry(req, "bench", relays, 1).await?.remove(0);
            transfer(&mut s, 2_000_000, plan.chunk).await?;
            let (cpu0, own0) = (o.relay_cpu(), cpu_secs(std::process::id()).unwrap_or(0.0));
            let dt = transfer(&mut s, plan.bulk_bytes, plan.chunk).await?;
            let cpu = o.relay_cpu() - cpu0;
            // This process holds the requester and the bulk target (and an idle bench thread).
            let own = cpu_secs(std::process::id()).unwrap_or(0.0) - own0;
            drop(s);
            let mbps = plan.bulk_bytes as f64 / dt.as_secs_f64() / 1e6;
            let mb_relayed = plan.bulk_bytes as f64 / 1e6 * f64::from(relays);
            let ms_per_mb = cpu * 1e3 / mb_relayed;
            progress(
                quiet,
                format!(
                    "throughput {hops} hops run {}: {mbps:.1} MB/s ({:.0} % of bound {:.0}), relay CPU {ms_per_mb:.2} ms/MB",
                    run + 1,
                    100.0 * mbps * 1e6 / bound,
                    bound / 1e6
                ),
            );
            let (t_mbps, t_ratio, t_cpu) =
                if hops == 3 { (at_least(150.0), at_least(60.0), at_most(2.5)) } else { (None, None, None) };
            rep.add(
                &format!("throughput_{hops}hops_mbps"),
                &format!("throughput {hops} hops ({relays} relay{})", if relays > 1 { "s" } else { "" }),
                "MB/s",
                t_mbps,
                mbps,
            );
            rep.add(
                &format!("throughput_{hops}hops_pct_of_bound"),
                &format!("  … of crypto bound ({:.0} MB/s)", bound / 1e6),
                "%",
                t_ratio,
                100.0 * mbps * 1e6 / bound,
            );
            rep.add(
                &format!("relay_cpu_{hops}hops_ms_per_mb"),
                &format!("relay CPU per MB, {hops} hops"),
                "ms/MB",
                t_cpu,
                ms_per_mb,
            );
            rep.add(
                &format!("endpoint_cpu_{hops}hops_ms_per_mb"),
                "  requester + target CPU per MB (together)",
                "ms/MB",
                None,
                own * 1e3 / (plan.bulk_bytes as f64 / 1e6),
            );
        }
    }
    Ok(())
}

pub(super) async fn build_figures(o: &Overlay, plan: &Plan, rep: &mut Report, quiet: bool) -> Result<(), PeerError> {
    let node = first_node(o)?;
    let chain = ChainId::new("bench").map_err(|e| PeerError::Internal(e.to_string()))?;
    // Links between relay processes are up once a circuit over every relay opened.
    drop(open_retry(node, "bench", 3, 1).await?);
    for run in 0..plan.runs {
        let (mut total, mut tracker, mut open) = (Vec::new(), Vec::new(), Vec::new());
        let mut failures = 0;
        while total.len() < plan.builds {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let t0 = Instant::now();
            let request = CircuitRequest { chain: chain.clone(), count: 1, relays: 2 };
            let grant = match node.request_grants(request).await.ok().and_then(|g| g.into_iter().next()) {
                Some(g) => g,
                None => {
                    failures += 1;
                    if failures > 20 {
                        return Err(PeerError::Process("circuit builds keep failing".into()));
                    }
                    continue;
                }
            };
            let t1 = Instant::now();
            match node.open_circuit(&grant).await {
                Ok(s) => {
                    let t2 = Instant::now();
                    total.push((t2 - t0).as_secs_f64() * 1e3);
                    tracker.push((t1 - t0).as_secs_f64() * 1e3);
                    open.push((t2 - t1).as_secs_f64() * 1e3);
                    drop(s);
                }
                Err(_) => failures += 1,
            }
        }
        let (p50, p99) = (percentile(&total, 50.0), percentile(&total, 99.0));
        progress(
            quiet,
            format!(
                "circuit build run {}: p50 {p50:.2} ms, p99 {p99:.2} ms (tracker p50 {:.2} ms, open p50 {:.2} ms)",
                run + 1,
                percentile(&tracker, 50.0),
                percentile(&open, 50.0)
            ),
        );
        rep.add("build_p50_ms", "circuit build p50 (3 hops, incl. tracker)", "ms", at_most(8.0), p50);
        rep.add("build_p99_ms", "circuit build p99", "ms", None, p99);
        rep.add(
            "build_tracker_p50_ms",
            "  … tracker request p50 (node's kept session)",
            "ms",
            None,
            percentile(&tracker, 50.0),
        );
        rep.add("build_open_p50_ms", "  … OPEN to first e2e DATA p50", "ms", None, percentile(&open, 50.0));
        // For comparison only (not part of the build figure): the same request over a new tracker session each
        // time, as nodes did before they kept theirs open (TCP connect, the tracker's RSA decryption of the
        // ClientHello, our Hello signature and its verification).
        let mut fresh = Vec::new();
        for _ in 0..plan.builds.min(20) {
            let t = Instant::now();
            let mut s = TrackerSession::connect(o.tracker, &o.tracker_key, &node.identity).await?;
            let req = ToTracker::RequestCircuits(CircuitRequest { chain: chain.clone(), count: 1, relays: 2 });
            if matches!(s.request(&req).await, Ok(FromTracker::Circuits(_))) {
                fresh.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        rep.add(
            "build_tracker_new_session_p50_ms",
            "  (tracker request p50 over a new session each)",
            "ms",
            None,
            percentile(&fresh, 50.0),
        );
    }
    Ok(())
}

/// Pumps one direct TCP connection to and from a memory stream: each message is `len u32 BE || bytes`.
pub(super) async fn pump(sock: TcpStream, mut side: CircuitStream) {
    let _ = sock.set_nodelay(true);
    let (mut rd, mut wr) = sock.into_split();
    let tx = side.sender();
    let up = async move {
        loop {
            let mut len = [0u8; 4];
            if rd.read_exact(&mut len).await.is_err() {
                return;
            }
            let n = u32::from_be_bytes(len) as usize;
            if n > MAX_MESSAGE {
                return;
            }
            let mut buf = vec![0u8; n];
            if rd.read_exact(&mut buf).await.is_err() || tx.send(buf).await.is_err() {
                return;
            }
        }
    };
    let down = async move {
        while let Ok(m) = side.recv().await {
            let len = (m.len() as u32).to_be_bytes();
            if wr.write_all(&len).await.is_err() || wr.write_all(&m).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

/// Serves `svc` over direct TCP: every connection becomes a message stream handed to the service.
pub(super) async fn direct_server(svc: Arc<dyn Service>) -> Result<SocketAddr, PeerError> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((sock, _)) = l.accept().await {
            let (ours, theirs) = CircuitStream::memory_pair();
            svc.accept(theirs);
            tokio::spawn(pump(sock, ours));
        }
    });
    Ok(addr)
}

/// `n` message streams to a direct server.
pub(super) async fn direct_streams(addr: SocketAddr, n: usize) -> Result<Vec<CircuitStream>, PeerError> {
    let mut out = Vec::new();
    for _ in 0..n {
        let sock = TcpStream::connect(addr).await?;
        let (ours, theirs) = CircuitStream::memory_pair();
        tokio::spawn(pump(sock, theirs));
        out.push(ours);
    }
    Ok(out)
}

/// Mines `blocks` regtest blocks of about `bytes` bytes each; returns the store and the transactions per
/// block used.
pub(super) fn mine_chain(blocks: u32, bytes: usize) -> Result<(ChainStore, usize, usize), PeerError> {
    let params = NetParams::by_name("regtest").ok_or(PeerError::Internal("no regtest parameters".into()))?;
    // Size one block to find the transaction count that gives `bytes`.
    let mut probe = ChainStore::new(params.clone())?;
    let guess = 450usize;
    let empty = chain::mine_regtest(&mut probe, 1, 0)?;
    let full = chain::mine_regtest(&mut probe, 1, guess)?;
    let (Some(empty), Some(full)) = (empty.first(), full.first()) else {
        return Err(PeerError::Internal("mining one block returned no block".into()));
    };
    let base = probe.block(empty)?.map(|b| b.total_size()).unwrap_or(300);
    let size = probe.block(full)?.map(|b| b.total_size()).unwrap_or(100_000);
    let per_tx = (size.saturating_sub(base) as f64 / guess as f64).max(1.0);
    let txs = ((bytes.saturating_sub(base)) as f64 / per_tx).round() as usize;
    let mut store = ChainStore::new(params)?;
    let hashes = chain::mine_regtest(&mut store, blocks, txs)?;
    let last = hashes.last().and_then(|h| store.block(h).ok().flatten()).map(|b| b.total_size()).unwrap_or(0);
    Ok((store, txs, last))
}

pub(super) async fn sync_figures(
    o: &Overlay,
    direct: SocketAddr,
    plan: &Plan,
    rep: &mut Report,
    quiet: bool,
) -> Result<(), PeerError> {
    let params = NetParams::by_name("regtest").ok_or(PeerError::Internal("no regtest parameters".into()))?;
    let node = first_node(o)?;
    for run in 0..plan.runs {
        let mut times = [0.0f64; 2];
        let mut mbps = [0.0f64; 2];
        // Alternate which goes first, so a load change on a shared machine hits both alike.
        let order: [usize; 2] = if run % 2 == 0 { [0, 1] } else { [1, 0] };
        for which in order {
            let streams = if which == 0 {
                // One serving node: four requests of one circuit each (a request's circuits go to distinct
                // targets).
                let mut v = Vec::new();
                for _ in 0..4 {
                    v.extend(open_retry(node, "regtest", 2, 1).await?);
                }
                v
            } else {
                direct_streams(direct, 4).await?
            };
            let store = chain::shared(ChainStore::new(params.clone())?);
            let t = Instant::now();
            let r = chain::sync_with(streams, &params, &store, &SyncOptions::default(), |_| {})
                .await
                .map_err(PeerError::from)?;
            let secs = t.elapsed().as_secs_f64();
            if r.blocks < u64::from(plan.blocks) {
                return Err(PeerError::Chain(format!("synced {} of {} blocks", r.blocks, plan.blocks)));
            }
            if let (Some(t), Some(m)) = (times.get_mut(which), mbps.get_mut(which)) {
                *t = secs;
                *m = r.bytes as f64 / secs / 1e6;
            }
        }
        let ratio = 100.0 * times[1] / times[0];
        progress(
            quiet,
            format!(
                "chain sync run {}: circuits {:.2}s ({:.0} MB/s), direct TCP {:.2}s ({:.0} MB/s): {ratio:.0} %",
                run + 1,
                times[0],
                mbps[0],
                times[1],
                mbps[1]
            ),
        );
        rep.add(
            "sync_circuits_s",
            &format!("chain sync {} blocks, 4 circuits (3 hops)", plan.blocks),
            "s",
            None,
            times[0],
        );
        rep.add("sync_circuits_mbps", "  … over circuits", "MB/s", None, mbps[0]);
        rep.add("sync_direct_s", &format!("chain sync {} blocks, 4 direct TCP", plan.blocks), "s", None, times[1]);
        rep.add("sync_direct_mbps", "  … over direct TCP", "MB/s", None, mbps[1]);
        rep.add("sync_pct_of_direct", "chain sync circuits vs direct TCP", "%", at_least(50.0), ratio);
    }
    Ok(())
}
