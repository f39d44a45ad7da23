//! The systemd units of docs/systemd/ (docs/OPERATORS.md, "Running as a service"): their hardening options are
//! there, and their command lines, with the unit's paths mapped into a temporary directory, start a tracker and a
//! peer that stop with exit status 0 on the unit's KillSignal within its TimeoutStopSec. A configuration mistake
//! exits with the status the units list in RestartPreventExitStatus. `.ci/systemd-verify` runs
//! `systemd-analyze verify` on them where the tool exists.
// Test code: a failed assumption should fail loudly, so unwrap/expect/panic/indexing are fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod harden;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use harden::*;

/// One unit file: `Key=value` lines by section (keys may repeat).
struct Unit {
    name: String,
    keys: HashMap<(String, String), Vec<String>>,
}

impl Unit {
    fn load(file: &str) -> Unit {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/systemd").join(file);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut section = String::new();
        let mut keys: HashMap<(String, String), Vec<String>> = HashMap::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = s.to_string();
                continue;
            }
            let (k, v) = line.split_once('=').unwrap_or_else(|| panic!("{file}: not Key=value: {line}"));
            keys.entry((section.clone(), k.trim().to_string())).or_default().push(v.trim().to_string());
        }
        Unit { name: file.to_string(), keys }
    }

    fn all(&self, key: &str) -> &[String] {
        self.keys.get(&("Service".to_string(), key.to_string())).map_or(&[], Vec::as_slice)
    }

    fn one(&self, key: &str) -> &str {
        match self.all(key) {
            [v] => v,
            other => panic!("{}: [Service] {key} set {} times", self.name, other.len()),
        }
    }

    /// The hardening every unit must keep (docs/OPERATORS.md lists what each one does).
    fn check_hardening(&self, user: &str, state: &str) {
        for (k, v) in [
            ("User", user),
            ("StateDirectory", state),
            ("StateDirectoryMode", "0700"),
            ("UMask", "0077"),
            ("NoNewPrivileges", "yes"),
            ("CapabilityBoundingSet", ""),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("PrivateDevices", "yes"),
            ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
            ("MemoryDenyWriteExecute", "yes"),
            ("SystemCallArchitectures", "native"),
            ("KillSignal", "SIGTERM"),
            ("RestartPreventExitStatus", "2"),
        ] {
            assert_eq!(self.one(k), v, "{}: [Service] {k}", self.name);
        }
        assert!(self.all("SystemCallFilter").iter().any(|f| f == "@system-service"), "{}: SystemCallFilter", self.name);
        let exec = self.one("ExecStart");
        assert!(
            exec.contains(&format!("--data-dir /var/lib/{state}")),
            "{}: data dir is the state dir: {exec}",
            self.name
        );
    }

    fn stop_timeout(&self) -> Duration {
        Duration::from_secs(self.one("TimeoutStopSec").parse().expect("TimeoutStopSec in seconds"))
    }

    /// ExecStart's arguments after the binary, with the unit's paths mapped into `root` and the tracker binary
    /// mapped to `anomos tracker` (the same program and flags).
    fn args(&self, root: &Path) -> Vec<String> {
        let mut words = self.one("ExecStart").split_whitespace();
        let bin = words.next().unwrap();
        let mut args = match bin {
            "/usr/local/bin/anomos" => Vec::new(),
            "/usr/local/bin/anomos-tracker" => vec!["tracker".to_string()],
            other => panic!("{}: unexpected binary {other}", self.name),
        };
        for w in words {
            let mapped = if w.starts_with("/etc/") || w.starts_with("/var/lib/") {
                root.join(w.trim_start_matches('/')).to_str().unwrap().to_string()
            } else {
                w.to_string()
            };
            args.push(mapped);
        }
        args
    }
}

/// Creates what systemd would: the configuration file (from `config`) and the state directory (mode 0700).
fn lay_out(unit: &Unit, root: &Path, state: &str, config: &str) {
    let etc = root.join("etc/anomos");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(etc.join("anomos.toml"), config).unwrap();
    let st = root.join("var/lib").join(state);
    std::fs::create_dir_all(&st).unwrap();
    std::fs::set_permissions(&st, std::fs::Permissions::from_mode(0o700)).unwrap();
    assert!(unit.args(root).iter().any(|a| a.ends_with("etc/anomos/anomos.toml")), "{}: --config", unit.name);
}

/// Sends SIGTERM and waits up to the unit's TimeoutStopSec for the exit status.
fn stop(p: &mut P, unit: &Unit) -> std::process::ExitStatus {
    p.signal("TERM");
    let deadline = Instant::now() + unit.stop_timeout();
    loop {
        if let Some(st) = p.child.try_wait().unwrap() {
            return st;
        }
        assert!(Instant::now() < deadline, "{} did not stop within TimeoutStopSec:\n{}", unit.name, p.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn units_are_hardened_and_their_command_lines_run_and_stop_cleanly() {
    let _serial = serial();
    let tracker_unit = Unit::load("anomos-tracker.service");
    let peer_unit = Unit::load("anomos-peer.service");
    tracker_unit.check_hardening("anomos-tracker", "anomos-tracker");
    peer_unit.check_hardening("anomos", "anomos");

    let dir = tempfile::tempdir().unwrap();
    let troot = dir.path().join("tracker-root");
    lay_out(
        &tracker_unit,
        &troot,
        "anomos-tracker",
        "[anomos-tracker]\nlisten = \"127.0.0.1:0\"\nallow-same-ip = true\n",
    );
    let mut tracker = P::start("tracker", tracker_unit.args(&troot), dir.path(), Vec::new(), Vec::new());
    let key = troot.join("var/lib/anomos-tracker/tracker.key");
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600, "tracker key in the state dir");

    let proot = dir.path().join("peer-root");
    let config = format!(
        "[peer]\nlisten = \"127.0.0.1:0\"\ntracker = \"{}\"\ntracker-fp = \"{}\"\n",
        tracker.listen, tracker.fingerprint
    );
    lay_out(&peer_unit, &proot, "anomos", &config);
    let mut peer = P::start("peer", peer_unit.args(&proot), dir.path(), Vec::new(), Vec::new());
    assert!(proot.join("var/lib/anomos/peer.key").exists(), "peer key in the state dir");
    assert!(stop(&mut peer, &peer_unit).success(), "peer exit status: {}", peer.log_text());
    assert!(stop(&mut tracker, &tracker_unit).success(), "tracker exit status: {}", tracker.log_text());

    // A configuration mistake exits with the status RestartPreventExitStatus names: no restart loop.
    std::fs::write(proot.join("etc/anomos/anomos.toml"), "[peer]\nno-such-flag = 1\n").unwrap();
    let out = Command::new(exe()).args(peer_unit.args(&proot)).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
}
