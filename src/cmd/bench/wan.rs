//! `anomos bench --only wan`: the overlay across an emulated wide-area network (issue 15).
//!
//! Every process runs in a network namespace of its own and every hop between two of them has the stated
//! round-trip time (and loss, and rate limit): the tracker in `wan-1`, relays in `wan-2`, `wan-3`, `wan-6`,
//! `wan-7`, serving peers in `wan-4` and `wan-8`…`wan-10`, the requester (`anomos fetch --relays 2`) in `wan-5`.
//! Next to each figure, raw TCP (one stream, `wan-4` → `wan-5`) moves the same bytes over the same kind of hop.
//!
//! The namespaces come from `wanemu` (`../shared/tools/wanemu/wan.sh`, or `--wanemu PATH`): a userspace
//! emulator joining namespaces through TUN devices, for kernels without `sch_netem`. Delay must be applied to
//! packets, not by a proxy that ends TCP: window auto-tuning reads the kernel's RTT of each link (SPEC §8), and
//! raw TCP must feel the delay too. Without root or without the emulator the group reports why it was skipped.
//! Figures are throughput of the blocks phase (`sync_time` of `anomos fetch`) and the time from starting the
//! fetch to its first stored block.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{at_least, at_most, progress, Plan, Report};
use crate::cmd::procs::{spawn_piped, spawn_ready_in, stop_all, Proc};
use crate::error::PeerError;

/// One network condition: per-hop RTT (ms), loss (%), rate limit (Mbit/s per host, 0 = none).
#[derive(Debug, Clone, Copy)]
struct Cond {
    rtt: u32,
    loss: u32,
    rate: u32,
}

impl Cond {
    fn key(&self) -> String {
        let mut k = format!("wan{}", self.rtt);
        if self.loss > 0 {
            k.push_str(&format!("_loss{}", self.loss));
        }
        if self.rate > 0 {
            k.push_str(&format!("_rate{}", self.rate));
        }
        k
    }
    fn text(&self) -> String {
        let mut t = format!("{} ms/hop", self.rtt);
        if self.loss > 0 {
            t.push_str(&format!(" + {} % loss", self.loss));
        }
        if self.rate > 0 {
            t.push_str(&format!(" + {} Mbit/s", self.rate));
        }
        t
    }
    /// Target of one circuit's throughput as a share of raw TCP (%).
    fn target(&self) -> Option<f64> {
        match (self.loss, self.rate) {
            (0, 0) => Some(80.0),
            (_, 0) => Some(60.0),
            _ => None,
        }
    }
}

const CONDS: [Cond; 5] = [
    Cond { rtt: 20, loss: 0, rate: 0 },
    Cond { rtt: 80, loss: 0, rate: 0 },
    Cond { rtt: 200, loss: 0, rate: 0 },
    Cond { rtt: 80, loss: 1, rate: 0 },
    Cond { rtt: 80, loss: 0, rate: 100 },
];

const HOSTS: usize = 10;
const RELAYS: [usize; 4] = [2, 3, 6, 7];
const SERVERS: [usize; 4] = [4, 8, 9, 10];
const REQUESTER: usize = 5;
const PORT: u16 = 7000;
const RAW_PORT: u16 = 9000;

fn ns(i: usize) -> String {
    format!("wan-{i}")
}

fn addr(i: usize, port: u16) -> String {
    format!("10.203.0.{i}:{port}")
}

/// Where the emulator is: `--wanemu`, `$ANOMOS_WANEMU`, or `../shared/tools/wanemu/wan.sh` beside the working
/// directory or the source tree.
fn find_wanemu(given: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = given {
        return Some(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("ANOMOS_WANEMU") {
        return Some(PathBuf::from(p));
    }
    let rel = Path::new("../shared/tools/wanemu/wan.sh");
    let here = std::env::current_dir().ok().map(|d| d.join(rel));
    let src = Some(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel));
    [here, src].into_iter().flatten().find(|p| p.is_file())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

/// The emulated network; taken down when dropped.
struct Wan(PathBuf);

impl Wan {
    fn run(&self, args: &[&str]) -> Result<String, PeerError> {
        let out = std::process::Command::new("bash").arg(&self.0).args(args).output()?;
        if !out.status.success() {
            return Err(PeerError::Process(format!(
                "wan.sh {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn set(&self, c: Cond) -> Result<(), PeerError> {
        // Segmentation offload off when packets may be dropped or paced (wanemu's README).
        let gso = if c.loss > 0 || c.rate > 0 { "0" } else { "1" };
        self.run(&["set", &c.rtt.to_string(), &c.loss.to_string(), &c.rate.to_string(), gso]).map(drop)
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        let _ = self.run(&["down"]);
    }
}

/// The hidden `bench --raw-serve ADDR --raw-bytes N`: accept one connection and send it N bytes.
pub(super) async fn raw_serve(addr: &str, bytes: u64) -> Result<(), PeerError> {
    use tokio::io::AsyncWriteExt;
    let l = tokio::net::TcpListener::bind(addr).await?;
    println!("raw ready listen={addr} fingerprint=-");
    let (mut s, _) = l.accept().await?;
    let buf = vec![0x5au8; 1 << 16];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.write_all(buf.get(..n).unwrap_or_default()).await?;
        left -= n as u64;
    }
    s.shutdown().await?;
    Ok(())
}

/// The hidden `bench --raw-fetch ADDR`: read until EOF; prints `raw bytes=N secs=S`.
pub(super) async fn raw_fetch(addr: &str) -> Result<(), PeerError> {
    use tokio::io::AsyncReadExt;
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let t = Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    println!("raw ready bytes={got} secs={:.4}", t.elapsed().as_secs_f64());
    Ok(())
}

/// Raw TCP throughput (MB/s) of `bytes` from the first serving peer's host to the requester's.
async fn raw_tcp(dir: &Path, bytes: u64) -> Result<f64, PeerError> {
    let srv = addr(SERVERS[0], RAW_PORT);
    let sargs: Vec<String> =
        ["bench", "--raw-serve", &srv, "--raw-bytes", &bytes.to_string()].map(String::from).to_vec();
    let (mut server, _, _) = spawn_ready_in(Some(&ns(SERVERS[0])), "raw-serve", &sargs, &dir.join("raw.log")).await?;
    let fargs: Vec<String> = ["bench", "--raw-fetch", &srv].map(String::from).to_vec();
    let (_fetch, line) =
        wait_line(Some(&ns(REQUESTER)), "raw-fetch", &fargs, &dir.join("rawf.log"), "raw ready").await?;
    let _ = server.stop(Duration::from_secs(2)).await;
    let f = |k: &str| field(&line, k).and_then(|v| v.parse::<f64>().ok());
    match (f("bytes"), f("secs")) {
        (Some(b), Some(s)) if s > 0.0 => Ok(b / s / 1e6),
        _ => Err(PeerError::Process(format!("raw TCP: {line}"))),
    }
}

/// `anomos [--log-level LEVEL] CMD --listen LISTEN --tracker TRACKER --tracker-fp FP --data-dir DATA`.
fn node_args(level: Option<&str>, cmd: &str, listen: &str, tracker: &str, fp: &str, data: &Path) -> Vec<String> {
    let mut a: Vec<String> = level.map(|l| vec!["--log-level".into(), l.into()]).unwrap_or_default();
    let data = data.display().to_string();
    a.extend(
        [cmd, "--listen", listen, "--tracker", tracker, "--tracker-fp", fp, "--data-dir", &data].map(String::from),
    );
    a
}

fn field<'a>(line: &'a str, k: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
}

/// Runs a child to its first line containing `want` (within 10 minutes).
async fn wait_line(
    ns: Option<&str>,
    name: &str,
    args: &[String],
    log: &Path,
    want: &str,
) -> Result<(Proc, String), PeerError> {
    let (p, mut lines) = spawn_piped(ns, name, args, log)?;
    let line = tokio::time::timeout(Duration::from_secs(600), async {
        while let Ok(Some(l)) = lines.next_line().await {
            if l.contains(want) {
                return Some(l);
            }
        }
        None
    })
    .await
    .map_err(|_| PeerError::Timeout("wan bench child"))?
    .ok_or_else(|| PeerError::Process(format!("{name} ended without '{want}'; see {}", log.display())))?;
    Ok((p, line))
}

/// What one fetch measured.
struct Fetched {
    /// Blocks-phase throughput, MB/s.
    mbps: f64,
    /// From starting `anomos fetch` to its first stored block, s.
    first_block: f64,
    /// From its circuits being open to its first stored block, s.
    open_to_block: f64,
}

/// One overlay (tracker, relays, `servers` serving peers) and one fetch over `circuits` circuits.
async fn fetch_once(
    dir: &Path,
    seed: &Path,
    servers: usize,
    circuits: u32,
    window: &[String],
) -> Result<Fetched, PeerError> {
    crate::cmd::ensure_private_dir(dir)?;
    let d = |n: &str| dir.join(n).display().to_string();
    let mut procs = Vec::new();
    // The tracker's default announce interval (30 s), as users run it: links between peers come up by the
    // start-up mechanisms (a new edge's knock, the acceptor's refresh on an AUTH it cannot place), not by
    // announces (SPEC §5.2).
    let targs: Vec<String> =
        ["tracker", "--listen", &addr(1, PORT), "--data-dir", &d("tracker")].map(String::from).to_vec();
    let (t, _, fp) = spawn_ready_in(Some(&ns(1)), "tracker", &targs, &dir.join("tracker.log")).await?;
    procs.push(t);
    let tracker = addr(1, PORT);
    let common = |host: usize, name: &str| -> Vec<String> {
        let mut a = node_args(Some("warn"), "peer", &addr(host, PORT), &tracker, &fp, &dir.join(name));
        a.extend(window.iter().cloned());
        a
    };
    for (k, &host) in SERVERS.iter().take(servers).enumerate() {
        let name = format!("server{k}");
        crate::cmd::ensure_private_dir(&dir.join(&name))?;
        std::fs::copy(seed, dir.join(&name).join("chain-regtest.redb"))?;
        let mut a = common(host, &name);
        a.extend(["--serve", "regtest"].map(String::from));
        procs.push(spawn_ready_in(Some(&ns(host)), &name, &a, &dir.join(format!("{name}.log"))).await?.0);
    }
    for &host in &RELAYS {
        let name = format!("relay{host}");
        procs.push(
            spawn_ready_in(Some(&ns(host)), &name, &common(host, &name), &dir.join(format!("{name}.log"))).await?.0,
        );
    }
    // Every peer has its links up (what a user's long-running overlay looks like): they come up within a second
    // or two of a peer's first announce.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut fargs = node_args(None, "fetch", &addr(REQUESTER, PORT), &tracker, &fp, &dir.join("requester"));
    fargs.extend(
        [
            "--chain",
            "regtest",
            "--relays",
            "2",
            "--circuits",
            &circuits.to_string(),
            "--timeout",
            "600",
            "--progress-interval",
            "3600000",
        ]
        .map(String::from),
    );
    fargs.extend(window.iter().cloned());
    let started = Instant::now();
    let (mut f, mut lines) = spawn_piped(Some(&ns(REQUESTER)), "fetch", &fargs, &dir.join("fetch.log"))?;
    let (mut first_block, mut opened) = (None, None);
    let mut done = None;
    let waited = tokio::time::timeout(Duration::from_secs(660), async {
        while let Ok(Some(l)) = lines.next_line().await {
            if opened.is_none() && l.starts_with("event circuits-open") {
                opened = Some(started.elapsed().as_secs_f64());
            }
            if first_block.is_none() && l.starts_with("progress blocks=") {
                first_block = Some(started.elapsed().as_secs_f64());
            }
            if l.starts_with("fetched") {
                done = Some(l);
                break;
            }
        }
    })
    .await;
    let _ = f.stop(Duration::from_secs(5)).await;
    stop_all(&mut procs, Duration::from_secs(5)).await;
    waited.map_err(|_| PeerError::Timeout("wan bench fetch"))?;
    let done =
        done.ok_or_else(|| PeerError::Process(format!("fetch failed; see {}", dir.join("fetch.log").display())))?;
    let num = |k: &str| field(&done, k).map(|v| v.trim_end_matches('s')).and_then(|v| v.parse::<f64>().ok());
    match (num("bytes"), num("sync_time"), first_block, opened) {
        (Some(b), Some(s), Some(fb), Some(o)) if s > 0.0 => {
            Ok(Fetched { mbps: b / s / 1e6, first_block: fb, open_to_block: fb - o })
        }
        _ => Err(PeerError::Process(format!("unexpected fetch summary: {done}"))),
    }
}

/// Mines the regtest chain every serving peer gets a copy of (a peer mining at start, as `--mine` does, next to
/// a tracker of its own on loopback); returns the store file.
async fn seed_chain(root: &Path, blocks: u32, txs: usize, quiet: bool) -> Result<PathBuf, PeerError> {
    let dir = root.join("seed");
    crate::cmd::ensure_private_dir(&dir)?;
    let t = Instant::now();
    let targs: Vec<String> =
        ["tracker", "--listen", "127.0.0.1:0", "--data-dir", &dir.join("tracker").display().to_string()]
            .map(String::from)
            .to_vec();
    let (mut tracker, taddr, fp) = spawn_ready_in(None, "seed-tracker", &targs, &root.join("seed-tracker.log")).await?;
    let mut a = node_args(Some("info"), "peer", "127.0.0.1:0", &taddr, &fp, &dir.join("peer"));
    a.extend(["--serve", "regtest", "--mine", &blocks.to_string(), "--mine-txs", &txs.to_string()].map(String::from));
    let log = root.join("seed.log");
    let (mut p, _lines) = spawn_piped(None, "seed", &a, &log)?;
    let deadline = Instant::now() + Duration::from_secs(600);
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("mined regtest blocks") {
        if Instant::now() > deadline {
            return Err(PeerError::Timeout("mining the wan bench chain"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = p.stop(Duration::from_secs(10)).await;
    let _ = tracker.stop(Duration::from_secs(5)).await;
    progress(
        quiet,
        format!("wan: mined {blocks} blocks of ~{} KB in {:.1}s", txs * 222 / 1000, t.elapsed().as_secs_f64()),
    );
    Ok(dir.join("peer").join("chain-regtest.redb"))
}

/// The WAN figures (see the module docs).
pub(super) async fn wan_figures(root: &Path, plan: &Plan, rep: &mut Report, quiet: bool) -> Result<(), PeerError> {
    let Some(script) = find_wanemu(plan.wanemu.as_deref()) else {
        rep.notes.push(
            "wan: skipped — no network emulator (wanemu's wan.sh: --wanemu PATH, $ANOMOS_WANEMU or \
             ../shared/tools/wanemu/wan.sh)"
                .into(),
        );
        return Ok(());
    };
    if !is_root() {
        rep.notes.push("wan: skipped — network namespaces need root".into());
        return Ok(());
    }
    let wan = Wan(script);
    let _ = wan.run(&["down"]);
    wan.run(&["up", &HOSTS.to_string()])?;
    let (blocks, txs) = if plan.quick { (20, 4500) } else { (100, 4500) };
    let seed = seed_chain(root, blocks, txs, quiet).await?;
    let bytes = std::fs::metadata(&seed)?.len();
    let window: Vec<String> =
        plan.tune.window.map(|w| vec!["--circuit-window".into(), w.to_string()]).unwrap_or_default();
    let conds: Vec<Cond> = if plan.quick { vec![CONDS[1]] } else { CONDS.to_vec() };
    for c in conds {
        wan.set(c)?;
        let (k, t) = (c.key(), c.text());
        for run in 0..plan.runs {
            let dir = root.join(format!("{k}-{run}"));
            crate::cmd::ensure_private_dir(&dir)?;
            let raw = raw_tcp(&dir, bytes).await?;
            let one = fetch_once(&dir.join("c1"), &seed, 1, 1, &window).await?;
            progress(
                quiet,
                format!(
                    "wan {t} run {}: raw TCP {raw:.1} MB/s, 1 circuit {:.1} MB/s, first block after {:.2}s ({:.2}s \
                     after the circuit opened)",
                    run + 1,
                    one.mbps,
                    one.first_block,
                    one.open_to_block
                ),
            );
            rep.add(&format!("{k}_raw_mbps"), &format!("raw TCP 1 stream, {t}"), "MB/s", None, raw);
            rep.add(&format!("{k}_c1_mbps"), &format!("1 circuit (2 relays), {t}"), "MB/s", None, one.mbps);
            let target = c.target().and_then(at_least);
            rep.add(&format!("{k}_c1_pct"), &format!("1 circuit vs raw TCP, {t}"), "%", target, 100.0 * one.mbps / raw);
            if c.rtt == 80 && c.loss == 0 && c.rate == 0 {
                rep.add(
                    &format!("{k}_first_block_s"),
                    &format!("fetch start to first block, {t}"),
                    "s",
                    at_most(1.2),
                    one.first_block,
                );
                // Issue 15's target: two circuit round trips (3 hops) plus the block's transfer at raw TCP's rate.
                let circuit_rtt = 3.0 * f64::from(c.rtt) / 1000.0;
                let block_mb = bytes as f64 / f64::from(blocks) / 1e6;
                // Beside it, what one block costs raw TCP on a fresh connection over one hop (from connected to
                // its last byte: a round trip, then TCP's slow start from its initial window): each hop of a
                // circuit whose links have not carried a block yet pays about that.
                let cold_dir = dir.join("raw-block");
                crate::cmd::ensure_private_dir(&cold_dir)?;
                let cold = block_mb / raw_tcp(&cold_dir, bytes / u64::from(blocks)).await?;
                rep.add(
                    &format!("{k}_raw_block_s"),
                    &format!("raw TCP, one block on a fresh connection (1 hop), {t}"),
                    "s",
                    None,
                    cold,
                );
                rep.add(
                    &format!("{k}_open_to_block_s"),
                    &format!("circuit open to first block, {t}"),
                    "s",
                    at_most(2.0 * circuit_rtt + block_mb / raw),
                    one.open_to_block,
                );
                let four = fetch_once(&dir.join("c4"), &seed, 4, 4, &window).await?;
                progress(quiet, format!("wan {t} run {}: 4 circuits {:.1} MB/s", run + 1, four.mbps));
                rep.add(&format!("{k}_c4_mbps"), &format!("4 circuits (2 relays each), {t}"), "MB/s", None, four.mbps);
                rep.add(
                    &format!("{k}_c4_pct"),
                    &format!("4 circuits vs raw TCP, {t}"),
                    "%",
                    at_least(150.0),
                    100.0 * four.mbps / raw,
                );
            }
        }
    }
    rep.notes.push(format!(
        "wan: {} hosts joined by wanemu; tracker, 4 relays, serving peers and the requester each in a namespace; \
         {} MB chain; MB/s of the blocks phase",
        HOSTS,
        bytes / 1_000_000
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn condition_keys_and_targets() {
        assert_eq!(CONDS[1].key(), "wan80");
        assert_eq!(CONDS[3].key(), "wan80_loss1");
        assert_eq!(CONDS[4].text(), "80 ms/hop + 100 Mbit/s");
        assert_eq!(CONDS[0].target(), Some(80.0));
        assert_eq!(CONDS[3].target(), Some(60.0));
        assert_eq!(CONDS[4].target(), None);
        assert_eq!(field("fetched bytes=10 sync_time=2.5s", "sync_time"), Some("2.5s"));
    }
}
