//! The command line as an operator meets it: the config file under environment variables under flags, typos in
//! the file, the annotated example file, shell completions. Real `anomos` processes; the only socket is a tracker
//! on 127.0.0.1 port 0.
// Test code: a failed assumption should fail loudly, so unwrap/expect/panic/indexing are fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

mod common;
use common::anomos;

fn example_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/anomos.example.toml")
}

/// Runs `cmd` until its stdout or stderr shows a line containing `needle` (or it exits, or 30 s pass); kills it;
/// returns (found, all output, exit status if it exited by itself).
fn run_until(mut cmd: Command, needle: &str) -> (bool, String, Option<i32>) {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    for stream in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let mut out = String::new();
    let mut found = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => {
                out.push_str(&line);
                out.push('\n');
                if line.contains(needle) {
                    found = true;
                    break;
                }
            }
            Err(_) => break, // both streams closed (the process exited) or time is up
        }
    }
    let exited = child.try_wait().unwrap().and_then(|s| s.code());
    let _ = child.kill();
    let status = child.wait().unwrap();
    (found, out, exited.or(if found { None } else { status.code() }))
}

fn key_in(dir: &Path) -> bool {
    dir.join("tracker.key").exists()
}

#[test]
fn flags_override_the_environment_which_overrides_the_config_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (file_dir, env_dir, flag_dir) = (tmp.path().join("file"), tmp.path().join("env"), tmp.path().join("flag"));
    let config = tmp.path().join("anomos.toml");
    std::fs::write(
        &config,
        format!(
            "log-format = \"json\"\n\n[anomos-tracker]\nlisten = \"127.0.0.1:0\"\ndata-dir = \"{}\"\nneighbors = 3\n",
            file_dir.display()
        ),
    )
    .unwrap();
    let tracker = |env: bool, flag: bool| {
        let mut c = anomos();
        c.arg("--config").arg(&config).arg("tracker");
        if env {
            c.env("ANOMOS_TRACKER_DATA_DIR", &env_dir);
        }
        if flag {
            c.arg("--data-dir").arg(&flag_dir);
        }
        // The listening line is logged after the ready line and names the neighbor setting.
        run_until(c, "tracker listening")
    };

    // File only: its data dir, its listen address (port 0), its top-level log format (JSON log lines).
    let (ok, out, _) = tracker(false, false);
    assert!(ok, "tracker did not start from the config file:\n{out}");
    assert!(key_in(&file_dir) && !key_in(&env_dir) && !key_in(&flag_dir), "{out}");
    assert!(
        out.lines().any(|l| l.starts_with('{') && l.contains("\"neighbors\":3")),
        "JSON log with neighbors=3:\n{out}"
    );

    // The environment beats the file.
    let (ok, out, _) = tracker(true, false);
    assert!(ok && key_in(&env_dir) && !key_in(&flag_dir), "{out}");

    // The flag beats both.
    let (ok, out, _) = tracker(true, true);
    assert!(ok && key_in(&flag_dir), "{out}");
}

#[test]
fn a_config_file_with_a_typo_is_refused_naming_the_file_and_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    for (text, needle) in [
        ("[peer]\nlisten-addr = \"127.0.0.1:1\"\n", "no setting `listen-addr`"),
        ("[peers]\nlisten = \"127.0.0.1:1\"\n", "[peers] is not a subcommand"),
        ("[fetch]\ncircuits = \"four\"\n", "`circuits` is set in the config file"),
        ("[peer\n", "TOML parse error"),
    ] {
        let config = tmp.path().join("bad.toml");
        std::fs::write(&config, text).unwrap();
        let out = anomos()
            .arg("--config")
            .arg(&config)
            .args(["fetch", "--tracker", "127.0.0.1:1", "--tracker-fp", "00"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text:?}: {err}");
        assert!(err.contains(needle), "{text:?}: {err}");
        assert!(err.contains(&config.display().to_string()), "{text:?}: {err}");
    }
    // A file that is not there.
    let out =
        anomos().args(["--config", "/nonexistent/anomos.toml", "keygen", "--out", "/nonexistent/k"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/anomos.toml"));
}

#[test]
fn the_annotated_example_config_is_valid_for_every_command() {
    let example = example_file();
    // Every section and key names a real subcommand and flag (checked whatever subcommand runs).
    let out = anomos().arg("--config").arg(&example).args(["completions", "bash"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // The values parse: the tracker starts from its section (on a free port, in a scratch dir) …
    let tmp = tempfile::tempdir().unwrap();
    let mut c = anomos();
    c.arg("--config")
        .arg(&example)
        .args(["tracker", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(tmp.path().join("t"));
    let (ok, out, _) = run_until(c, "anomos-tracker ready");
    assert!(ok, "{out}");

    // … and a peer gets past parsing to its first tracker attempt (nothing listens on port 1).
    let mut c = anomos();
    c.arg("--config").arg(&example).args(["peer", "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"]);
    c.args(["--tracker", "127.0.0.1:1", "--data-dir"]);
    c.arg(tmp.path().join("p"));
    let (ok, out, code) = run_until(c, "not reachable yet");
    assert!(ok, "exit {code:?}:\n{out}");
}

#[test]
fn completions_are_generated_for_both_binaries() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = anomos().args(["completions", shell]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains("fetch") && text.contains("tracker-fp"), "{shell}: {text}");
        let out = anomos().args(["completions", shell, "--binary", "anomos-tracker"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains("anomos-tracker") && text.contains("allow-same-ip"), "{shell}");
        assert!(!text.contains("tracker-fp"), "{shell}: the tracker's script offers peer flags");
    }
}

/// Issue 17, point 4: a peer whose configuration is wrong says so and exits before it prints `ready` or creates
/// anything: no data directory (key, store, control socket), no bound port left behind.
#[test]
fn a_bad_peer_configuration_is_refused_before_ready_and_creates_nothing() {
    let o = common::Overlay::new();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap().to_string();
    for (i, (extra, needle)) in [
        (vec!["--bridge", "127.0.0.1:0", "--bridge-chain", "litecoin"], "--bridge-chain"),
        (vec!["--bridge", busy_addr.as_str()], "--bridge"),
        (vec!["--serve", "regtest", "--mine-interval", "0"], "--mine-interval"),
        (vec!["--serve", "regtest", "--upstream", "127.0.0.1"], "--upstream"),
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("bad{i}");
        let mut args: Vec<String> = vec!["peer".into()];
        args.extend(o.peer_args(&name));
        args.extend(extra.iter().map(|s| s.to_string()));
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, stdout, log) = common::run(&name, &a, o.dir.path(), Duration::from_secs(20));
        assert!(!ok, "{extra:?} was accepted: {stdout}\n{log}");
        assert!(!stdout.contains("ready"), "{extra:?}: announced readiness first: {stdout}");
        assert!(log.contains(needle), "{extra:?}: the error does not name {needle}: {log}");
        let dir = o.data_dir(&name);
        assert!(
            !dir.exists(),
            "{extra:?}: created {} ({:?})",
            dir.display(),
            std::fs::read_dir(&dir).map(|d| d.count())
        );
    }
}

#[test]
fn a_bad_key_file_ends_the_start_even_while_the_tracker_is_unreachable() {
    // The identity key is loaded while the tracker's key is fetched (SPEC revision 15): a key file that cannot be
    // read must still end the start at once, not after the tracker answers.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("peer");
    std::fs::create_dir(&data).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    std::fs::write(data.join("peer.key"), "not a key\n").unwrap();
    #[cfg(unix)]
    {
        // Private, as a key must be: what ends the start is its content, not its mode.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(data.join("peer.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    // A port nobody listens on: every key fetch is refused, and the peer would retry for ever.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let mut cmd = anomos();
    let fp = "ab".repeat(32);
    let data_s = data.display().to_string();
    cmd.args(["peer", "--listen", "127.0.0.1:0", "--tracker", &closed, "--tracker-fp", &fp, "--data-dir", &data_s]);
    let (ready, out, exited) = run_until(cmd, "ready");
    assert!(!ready, "{out}");
    assert!(exited.is_some_and(|c| c != 0), "still running (retrying the tracker?): {out}");
    assert!(out.contains("peer.key"), "the error does not name the key file: {out}");
}
