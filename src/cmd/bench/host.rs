//! What `anomos bench` reads off this host: `/proc` CPU and memory of a process, load, cores.

/// Clock ticks per second of `/proc/<pid>/stat` times (USER_HZ; 100 on every Linux this runs on).
pub(super) const CLK_TCK: f64 = 100.0;

/// CPU seconds (user + system) a process has used.
pub(super) fn cpu_secs(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat; `rest` starts at field 3.
    let ut: f64 = f.get(11)?.parse().ok()?;
    let st: f64 = f.get(12)?.parse().ok()?;
    Some((ut + st) / CLK_TCK)
}

/// Resident set size of a process, in bytes.
pub(super) fn rss_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub(super) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

pub(super) fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

pub(super) fn progress(quiet: bool, msg: impl std::fmt::Display) {
    if !quiet {
        eprintln!("bench: {msg}");
    }
}
