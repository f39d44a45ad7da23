//! `anomos status`: asks a running peer's local control endpoint (`<data-dir>/control.sock`, see
//! [`crate::control`]) for its links, circuits, chain and tracker state, and prints a table (or the JSON).

use std::path::PathBuf;

use clap::Args;
use serde_json::Value;

use crate::error::PeerError;

/// Flags of `anomos status`.
#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    /// Data directory of the running peer (its control socket is `<DIR>/control.sock`).
    #[arg(long, value_name = "DIR", default_value = "./anomos-data")]
    pub data_dir: PathBuf,
    /// Print the peer's answer as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs `anomos status`.
pub async fn run(args: &StatusArgs) -> Result<(), PeerError> {
    let v = crate::control::query(&args.data_dir).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v).map_err(|e| PeerError::Internal(e.to_string()))?);
    } else {
        print!("{}", table(&v));
    }
    Ok(())
}

fn age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// The human-readable form of a status document.
pub fn table(v: &Value) -> String {
    use std::fmt::Write;
    let u = |p: &str| v.pointer(p).and_then(Value::as_u64).unwrap_or(0);
    let s = |p: &str| v.pointer(p).and_then(Value::as_str).unwrap_or("-").to_string();
    let mut o = String::new();
    let _ = writeln!(
        o,
        "peer       {}  listen {}  up {}",
        &s("/fingerprint")[..16.min(s("/fingerprint").len())],
        s("/listen"),
        age(u("/uptime_secs"))
    );
    let last = v.pointer("/tracker/last_announce_ago_secs").and_then(Value::as_u64);
    let _ = writeln!(
        o,
        "tracker    {}  neighbors {}  last announce {}{}",
        s("/tracker/addr"),
        u("/tracker/neighbors"),
        last.map(|a| format!("ok {} ago", age(a))).unwrap_or_else(|| "never".into()),
        v.pointer("/tracker/last_error")
            .and_then(Value::as_str)
            .map(|e| format!("  (last error: {e})"))
            .unwrap_or_default()
    );
    match v.get("chain").filter(|c| !c.is_null()) {
        Some(c) if c.get("source").and_then(Value::as_str) == Some("upstream") => {
            let reach = match v.pointer("/chain/upstream/reachable").and_then(Value::as_bool) {
                None => "not checked yet".to_string(),
                Some(r) => format!(
                    "{}, checked {} ago",
                    if r {
                        "reachable".to_string()
                    } else {
                        format!("UNREACHABLE: {}", s("/chain/upstream/last_error"))
                    },
                    age(u("/chain/upstream/checked_ago_secs"))
                ),
            };
            let _ = writeln!(
                o,
                "chain      {} (serving via upstream node {}: {reach})",
                s("/chain/name"),
                s("/chain/upstream/addr")
            );
        }
        Some(_) => {
            let _ = writeln!(
                o,
                "chain      {} ({}{})  height {}  headers {}  blocks {}  sync {}{}",
                s("/chain/name"),
                s("/chain/role"),
                if s("/chain/role") == "serving" { " from own store" } else { "" },
                u("/chain/height"),
                u("/chain/headers"),
                u("/chain/blocks"),
                s("/sync/phase"),
                if s("/sync/phase") == "blocks" {
                    format!(" {}/{}", u("/sync/blocks_done"), u("/sync/blocks_total"))
                } else {
                    String::new()
                }
            );
        }
        None => {
            let _ = writeln!(o, "chain      none (relay only)");
        }
    }
    let _ = writeln!(
        o,
        "circuits   relay {}  origin {}  target {}  opening {}  (limit {})",
        u("/circuits/relay"),
        u("/circuits/origin"),
        u("/circuits/target"),
        u("/circuits/opening"),
        u("/circuits/max")
    );
    let _ = writeln!(
        o,
        "buffer     {} of {} cells queued  relayed {} cells",
        u("/buffer/queued_cells"),
        u("/buffer/budget"),
        u("/counters/cells_relayed")
    );
    let links = v.get("links").and_then(Value::as_array).cloned().unwrap_or_default();
    let _ = writeln!(o, "links      {}", links.len());
    if !links.is_empty() {
        let _ = writeln!(o, "  {:<18} {:<4} {:>9} {:>8} {:>7}", "NEIGHBOR", "DIR", "AGE", "CIRCUITS", "QUEUED");
        for l in &links {
            let g = |k: &str| l.get(k).and_then(Value::as_u64).unwrap_or(0);
            let _ = writeln!(
                o,
                "  {:<18} {:<4} {:>9} {:>8} {:>7}",
                l.get("peer").and_then(Value::as_str).unwrap_or("-"),
                l.get("direction").and_then(Value::as_str).unwrap_or("-"),
                age(g("age_secs")),
                g("circuits"),
                g("queued_cells")
            );
        }
    }
    let down = v.get("unreachable").and_then(Value::as_array).cloned().unwrap_or_default();
    if !down.is_empty() {
        let _ = writeln!(o, "unreachable neighbors {} (we dial them; reported to the tracker)", down.len());
        for d in &down {
            let g = |k: &str| d.get(k).and_then(Value::as_u64).unwrap_or(0);
            let t = |k: &str| d.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
            let _ = writeln!(
                o,
                "  {:<18} {}  {} failed dials over {}, next in {}: {}",
                t("peer"),
                t("addr"),
                g("failed_dials"),
                age(g("down_secs")),
                age(g("next_dial_in_secs")),
                t("last_error")
            );
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_shows_links_and_state() {
        let v = serde_json::json!({
            "fingerprint": "00112233445566778899", "listen": "127.0.0.1:1", "uptime_secs": 130,
            "links": [{"peer": "abcd", "direction": "out", "age_secs": 5, "queued_cells": 2, "circuits": 1}],
            "circuits": {"relay": 3, "origin": 0, "target": 1, "opening": 0, "max": 10},
            "buffer": {"queued_cells": 2, "budget": 100},
            "chain": null, "sync": {"phase": "idle"},
            "tracker": {"addr": "127.0.0.1:2", "neighbors": 4, "last_announce_ago_secs": 3, "last_error": null},
            "counters": {"cells_relayed": 9},
        });
        let t = table(&v);
        assert!(t.contains("up 2m10s"), "{t}");
        assert!(t.contains("relay 3  origin 0  target 1"), "{t}");
        assert!(t.contains("last announce ok 3s ago"), "{t}");
        assert!(t.contains("abcd") && t.contains("out"), "{t}");
        assert!(t.contains("chain      none"), "{t}");
    }

    #[test]
    fn table_shows_how_a_chain_is_served() {
        let mut v = serde_json::json!({
            "chain": {"name": "regtest", "role": "serving", "source": "upstream",
                      "upstream": {"addr": "127.0.0.1:18444", "reachable": false, "checked_ago_secs": 4,
                                   "last_error": "Connection refused (os error 111)"}},
        });
        let t = table(&v);
        assert!(
            t.contains("regtest (serving via upstream node 127.0.0.1:18444: UNREACHABLE: Connection refused"),
            "{t}"
        );
        assert!(t.contains("checked 4s ago"), "{t}");
        assert!(!t.contains("none (relay only)"), "{t}");
        v["chain"]["upstream"]["reachable"] = true.into();
        assert!(table(&v).contains("127.0.0.1:18444: reachable, checked 4s ago"), "{}", table(&v));
        v["chain"] = serde_json::json!({"name": "regtest", "role": "serving", "source": "store", "height": 7});
        v["unreachable"] = serde_json::json!([{"peer": "abcd", "addr": "127.0.0.1:9", "failed_dials": 5,
            "down_secs": 20, "next_dial_in_secs": 4, "last_error": "refused"}]);
        let t = table(&v);
        assert!(t.contains("unreachable neighbors 1") && t.contains("abcd") && t.contains("5 failed dials"), "{t}");
        assert!(table(&v).contains("regtest (serving from own store)  height 7"), "{}", table(&v));
    }
}
