//! Raw figures of `anomos bench`: loopback TCP, AES-256-GCM, AES-256-CTR and RSA-OAEP on this machine, and the crypto bound of a circuit derived from them.

use super::*;

/// Per-byte costs on one core, measured in this run.
#[derive(Debug, Clone, Copy)]
pub(super) struct Costs {
    /// Seconds per byte of one GCM pass (seal or open).
    pub(super) gcm: f64,
    /// Seconds per byte of one CTR pass.
    pub(super) ctr: f64,
    /// CPU seconds per byte moved over loopback TCP (sender and receiver together).
    pub(super) tcp_cpu: f64,
}

/// CPU time the calling thread has used, in seconds (`/proc/thread-self/schedstat`, nanoseconds), or `None`
/// where the kernel does not provide it.
pub(super) fn thread_cpu() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: f64 = s.split_whitespace().next()?.parse().ok()?;
    Some(ns / 1e9)
}

/// Runs `f` (which returns the units of work it did) `batch` times at a go for `budget` of wall time; returns
/// units per second of this thread's CPU time (wall time where that is unavailable), so that other load on
/// a shared machine does not count as cost.
pub(super) fn per_cpu_second(budget: Duration, batch: u32, mut f: impl FnMut() -> u64) -> f64 {
    let (t, c0) = (Instant::now(), thread_cpu());
    let mut units = 0u64;
    while t.elapsed() < budget {
        for _ in 0..batch {
            units += f();
        }
    }
    let secs = match (c0, thread_cpu()) {
        (Some(a), Some(b)) if b > a => b - a,
        _ => t.elapsed().as_secs_f64(),
    };
    units as f64 / secs
}

/// MB per CPU-second of AES-256-GCM (seal + open of one link cell, counted as two passes) and of AES-256-CTR
/// (one DATA payload), on one core. Both go through the types the node itself uses ([`AeadCounter`] for link
/// cells and end-to-end records, [`CtrLayer`] for onion layers), so the crypto bound follows whatever
/// implementation the node runs.
pub(super) fn raw_crypto(budget: Duration) -> (f64, f64) {
    let key = Secret([7u8; 32]);
    let mut seal = AeadCounter::new(&key);
    let mut open = AeadCounter::new(&key);
    let mut buf = vec![0x11u8; CELL_LEN];
    let gcm = per_cpu_second(budget, 16, || {
        let tag = seal.seal_in_place(b"", &mut buf).unwrap_or([0; 16]);
        let _ = open.open_in_place(b"", &mut buf, &tag, "bench");
        2 * CELL_LEN as u64
    }) / 1e6;
    let layer = CtrLayer::new(&key);
    let mut payload = vec![0u8; CELL_PAYLOAD_LEN];
    let mut i = 0u64;
    let ctr = per_cpu_second(budget, 16, || {
        layer.apply(i, &mut payload);
        i += 1;
        CELL_PAYLOAD_LEN as u64
    }) / 1e6;
    std::hint::black_box(&payload);
    (gcm, ctr)
}

/// One stream of `bytes` over loopback TCP between two threads of this process: MB/s (wall time), and CPU
/// seconds per byte of both threads together.
pub(super) fn raw_tcp(bytes: u64) -> std::io::Result<(f64, f64)> {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let reader = std::thread::spawn(move || -> std::io::Result<(u64, f64)> {
        let c0 = thread_cpu().unwrap_or(0.0);
        let (mut s, _) = l.accept()?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0u64;
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok((got, thread_cpu().unwrap_or(0.0) - c0));
            }
            got += n as u64;
        }
    });
    let c0 = thread_cpu().unwrap_or(0.0);
    let t = Instant::now();
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    // One link write: a batch of 32 sealed cells.
    let buf = vec![0x5au8; 32 * 4133];
    let mut sent = 0u64;
    while sent < bytes {
        s.write_all(&buf)?;
        sent += buf.len() as u64;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let (got, rcpu) = reader.join().map_err(|_| std::io::Error::other("reader panicked"))??;
    let secs = t.elapsed().as_secs_f64();
    let cpu = thread_cpu().unwrap_or(0.0) - c0 + rcpu;
    Ok((got as f64 / secs / 1e6, cpu / got.max(1) as f64))
}

/// RSA-OAEP-2048 decryptions and tracking-code peels per CPU-second, on one core.
pub(super) fn raw_rsa(budget: Duration) -> Result<(f64, f64), PeerError> {
    let mut rng = rand::rngs::OsRng;
    let id = Identity::generate(&mut rng, 2048)?;
    let ct = id.public().encrypt(&[7u8; 32])?;
    let rsa = per_cpu_second(budget, 1, || u64::from(id.decrypt(&ct, "bench").is_ok()));
    let layer = |kind: LayerKind, i: u8| Layer {
        prev: NeighborId(u64::from(i) + 1),
        kind,
        hop_secret: Secret([i; 32]),
        expires: u64::MAX,
        replay_tag: [i; 16],
    };
    let chain = ChainId::new("bench").map_err(|e| PeerError::Internal(e.to_string()))?;
    let hops = vec![
        HopSpec { key: id.public().clone(), layer: layer(LayerKind::Relay { next: NeighborId(9) }, 1) },
        HopSpec {
            key: id.public().clone(),
            layer: layer(LayerKind::Target { chain, session: [3; 16], e2e_secret: Secret([4; 32]) }, 2),
        },
    ];
    let tc = tc::build(&hops, &mut rng)?;
    let peel = per_cpu_second(budget, 1, || u64::from(tc::peel(&tc, &id).is_ok()));
    Ok((rsa, peel))
}

pub(super) async fn raw_figures(plan: &Plan, rep: &mut Report, quiet: bool) -> Result<Costs, PeerError> {
    for run in 0..plan.runs {
        let budget = plan.crypto_time;
        let (gcm, ctr) = tokio::task::spawn_blocking(move || raw_crypto(budget))
            .await
            .map_err(|e| PeerError::Internal(e.to_string()))?;
        let bytes = plan.tcp_bytes;
        let (tcp, tcp_cpu) = tokio::task::spawn_blocking(move || raw_tcp(bytes))
            .await
            .map_err(|e| PeerError::Internal(e.to_string()))??;
        progress(quiet, format!("raw run {}: GCM {gcm:.0} MB/s, CTR {ctr:.0} MB/s, TCP {tcp:.0} MB/s", run + 1));
        rep.add("raw_gcm_mbps", "raw AES-256-GCM (seal+open, AWS-LC as the node), per core", "MB/s", None, gcm);
        rep.add("raw_ctr_mbps", "raw AES-256-CTR, per core", "MB/s", None, ctr);
        rep.add("raw_tcp_mbps", "raw loopback TCP, 1 stream", "MB/s", None, tcp);
        rep.add("raw_tcp_cpu_ms_per_mb", "raw loopback TCP CPU (both ends)", "ms/MB", None, tcp_cpu * 1e9);
    }
    let g = rep.median_of("raw_gcm_mbps").unwrap_or(f64::NAN);
    let c = rep.median_of("raw_ctr_mbps").unwrap_or(f64::NAN);
    let t = rep.median_of("raw_tcp_cpu_ms_per_mb").unwrap_or(f64::NAN);
    Ok(Costs { gcm: 1.0 / (g * 1e6), ctr: 1.0 / (c * 1e6), tcp_cpu: t / 1e9 })
}

/// Throughput bounds (bytes/s of application data) of one circuit with `hops` onion layers (relays + 1),
/// per docs/PERFORMANCE.md: (crypto bound over all cores, its busiest single stage, crypto+TCP bound).
pub(super) fn bounds(c: &Costs, hops: usize, cores: usize) -> (f64, f64, f64) {
    let n = hops as f64;
    let (link, payload, record) = (CELL_LEN as f64, CELL_PAYLOAD_LEN as f64, (CELL_PAYLOAD_LEN - 16) as f64);
    let data = RECORD_DATA_MAX as f64;
    // Per cell: n links × (seal + open) over CELL_LEN, e2e seal + open over the record, 2n CTR passes.
    let cell_cpu = 2.0 * n * link * c.gcm + 2.0 * record * c.gcm + 2.0 * n * payload * c.ctr;
    let total = cores as f64 * data / cell_cpu;
    // The requester's reader task does its link open, n CTR layers and the e2e open in sequence.
    let stage = data / (link * c.gcm + n * payload * c.ctr + record * c.gcm);
    let tcp = n * (link + 16.0) * c.tcp_cpu;
    let with_tcp = cores as f64 * data / (cell_cpu + tcp);
    (total.min(stage), stage, with_tcp.min(stage))
}

/// The overlay's first (requesting) node.
pub(super) fn first_node(o: &Overlay) -> Result<&Arc<Node>, PeerError> {
    o.nodes.first().ok_or_else(|| PeerError::Internal("overlay started without nodes".into()))
}
