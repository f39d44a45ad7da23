//! Multi-host: every process in its own network namespace with its own address (10.200.0.x), the namespaces
//! joined by veth pairs to a bridge that lives in a namespace of its own — no traffic leaves the namespaces
//! this test creates. A chain is synced over 3-hop circuits; then one relay's link is cut (`ip link set …
//! down`: its TCP connections stall rather than close) and the sync must recover.
//!
//! Needs root and iproute2 (`ip`); skipped with a message otherwise (CI runs it as root).
// Test code: a failed assumption should fail loudly, so unwrap/expect/panic/indexing are fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod harden;

use std::process::Command;
use std::time::Duration;

use harden::*;

/// Runs `ip <args>`; panics with its stderr on failure.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// The namespaces of one test run; deleted on drop (also when the test fails).
struct Namespaces {
    names: Vec<String>,
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in self.names.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// Why namespaces cannot be used here, if they cannot.
fn unavailable() -> Option<String> {
    // The effective uid, from /proc.
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|v| v.split_whitespace().nth(1));
    if euid != Some("0") {
        return Some("not running as root".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => {}
        _ => return Some("`ip` (iproute2) is not installed".into()),
    }
    let probe = format!("anmprobe{}", std::process::id());
    match Command::new("ip").args(["netns", "add", &probe]).output() {
        Ok(o) if o.status.success() => {
            let _ = Command::new("ip").args(["netns", "del", &probe]).status();
            None
        }
        Ok(o) => Some(format!("cannot create network namespaces: {}", String::from_utf8_lossy(&o.stderr).trim())),
        Err(e) => Some(format!("cannot run ip: {e}")),
    }
}

/// A bridge namespace and `n` host namespaces `<prefix>h1..hn` with addresses 10.200.0.1..n.
fn build(prefix: &str, n: usize) -> Namespaces {
    let br = format!("{prefix}br");
    let mut ns = Namespaces { names: vec![br.clone()] };
    ip(&["netns", "add", &br]);
    ip(&["-n", &br, "link", "add", "br0", "type", "bridge"]);
    ip(&["-n", &br, "link", "set", "br0", "up"]);
    for i in 1..=n {
        let h = format!("{prefix}h{i}");
        ip(&["netns", "add", &h]);
        ns.names.push(h.clone());
        let port = format!("p{i}");
        // Both ends are created inside the test's namespaces (never in the host's).
        ip(&["-n", &br, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &h]);
        ip(&["-n", &br, "link", "set", &port, "master", "br0", "up"]);
        ip(&["-n", &h, "addr", "add", &format!("10.200.0.{i}/24"), "dev", "eth0"]);
        ip(&["-n", &h, "link", "set", "eth0", "up"]);
        ip(&["-n", &h, "link", "set", "lo", "up"]);
    }
    ns
}

#[test]
fn sync_across_namespaces_and_recover_from_a_cut_link() {
    if let Some(why) = unavailable() {
        eprintln!("SKIPPED sync_across_namespaces_and_recover_from_a_cut_link: {why}");
        return;
    }
    let _serial = serial();
    let prefix = format!("anm{}", std::process::id() % 100_000);
    // h1 tracker, h2..h7 relays, h8 server, h9 requester.
    let ns = build(&prefix, 9);
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let inns = |i: usize| vec!["ip".to_string(), "netns".into(), "exec".into(), format!("{prefix}h{i}")];
    let tracker = P::start(
        "tracker",
        ["tracker", "--listen", "10.200.0.1:7700", "--data-dir", &d("tracker"), "--interval", "2"]
            .map(String::from)
            .to_vec(),
        dir.path(),
        inns(1),
        Vec::new(),
    );
    let join = |name: &str, i: usize| -> Vec<String> {
        [
            "--listen",
            &format!("10.200.0.{i}:8633"),
            "--tracker",
            "10.200.0.1:7700",
            "--tracker-fp",
            &tracker.fingerprint,
            "--data-dir",
            &d(name),
            "--link-idle-timeout",
            "3",
            "--keepalive",
            "1",
        ]
        .map(String::from)
        .to_vec()
    };
    let mut relays = Vec::new();
    let traces: Vec<_> = (0..6).map(|r| dir.path().join(format!("relay{r}.trace"))).collect();
    for (r, trace) in traces.iter().enumerate() {
        let name = format!("relay{r}");
        let mut args = vec!["peer".to_string()];
        args.extend(join(&name, r + 2));
        args.extend(["--cell-trace".to_string(), trace.to_str().unwrap().to_string()]);
        relays.push(P::start(&name, args, dir.path(), inns(r + 2), Vec::new()));
    }
    let mut args = vec!["peer".to_string()];
    args.extend(join("server", 8));
    args.extend(["--serve", "regtest", "--mine", "4000", "--mine-txs", "10"].map(String::from));
    let server = P::start("server", args, dir.path(), inns(8), Vec::new());
    let mut args = vec!["fetch".to_string()];
    args.extend(join("requester", 9));
    args.extend(
        ["--chain", "regtest", "--relays", "2", "--circuits", "1", "--timeout", "240", "--stall-timeout", "60"]
            .map(String::from),
    );
    let mut fetch = P::start("requester", args, dir.path(), inns(9), Vec::new());
    assert!(server.listen.starts_with("10.200.0.8:"), "{}", server.listen);

    fetch.lines_until(Duration::from_secs(120), |l| l.starts_with("progress blocks=")).unwrap_or_else(|| {
        panic!("no blocks flowing: {:?}\n{}", fetch.seen, fetch.log_text());
    });
    let victim = (0..6)
        .find(|&r| std::fs::metadata(&traces[r]).map(|m| m.len() > 0).unwrap_or(false))
        .expect("a relay on the path");
    let cut = unix_ms();
    ip(&["-n", &format!("{prefix}h{}", victim + 2), "link", "set", "eth0", "down"]);
    eprintln!("cut the link of relay{victim} (10.200.0.{})", victim + 2);
    let failed = fetch
        .lines_until(Duration::from_secs(30), |l| l.starts_with("event circuit-failed"))
        .unwrap_or_else(|| panic!("the cut circuit never broke: {:?}", fetch.seen));
    let after = field(&failed, "unix_ms").and_then(|v| v.parse::<u128>().ok()).unwrap() - cut;
    eprintln!("circuit broke {after} ms after the cut: {failed}");
    assert!(after < 6000, "detected after {after} ms (idle timeout 3 s)");
    let done = finish_fetch(&mut fetch, Duration::from_secs(200));
    eprintln!("{done}");
    assert_full_chain(&done, 4000);
    // The hosts saw each other's namespace addresses only.
    assert!(tracker.log_text().contains("10.200.0.8"), "tracker never saw the server's address");
    drop(fetch);
    drop(server);
    drop(relays);
    drop(tracker);
    drop(ns);
}
