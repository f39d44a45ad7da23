//! Reading the tracker process: its metrics (`GET /metrics`) and its key, as a peer fetches it.

use std::net::SocketAddr;
use std::time::Duration;

use anomos_proto::identity::Fingerprint;
use anomos_proto::tracker;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The tracker's own counters (`GET /metrics`): the lines that say what it refused, and its sizes.
pub async fn tracker_counters(addr: SocketAddr) -> Vec<String> {
    let get = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: tracker\r\n\r\n").await?;
        let mut body = String::new();
        s.read_to_string(&mut body).await?;
        Ok::<_, std::io::Error>(body)
    };
    let body = tokio::time::timeout(Duration::from_secs(10), get).await.ok().and_then(Result::ok).unwrap_or_default();
    let keep = [
        "anomos_tracker_refused_total{",
        "anomos_tracker_peers ",
        "anomos_tracker_edges ",
        "anomos_tracker_sessions_total ",
        "anomos_tracker_sessions ",
        "anomos_tracker_resumptions_total ",
        "anomos_tracker_tickets ",
        "anomos_tracker_state_lock_",
        "anomos_tracker_request_seconds_bucket{kind=\"circuits\"",
    ];
    let zero = |l: &str| l.starts_with("anomos_tracker_refused_total{") && l.ends_with(" 0");
    body.lines().filter(|l| keep.iter().any(|k| l.starts_with(k)) && !zero(l)).map(str::to_string).collect()
}

/// The tracker's key, fetched as a peer pinned to `fp` does (`"ANOMOSK1"`).
pub async fn fetch_key(addr: SocketAddr, fp: &Fingerprint) -> Result<anomos_proto::identity::PublicKey, String> {
    let mut s = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    s.write_all(&tracker::KEY_FETCH_MAGIC).await.map_err(|e| e.to_string())?;
    let mut prefix = [0u8; 2];
    s.read_exact(&mut prefix).await.map_err(|e| e.to_string())?;
    let mut der = vec![0u8; tracker::key_answer_len(prefix).map_err(|e| e.to_string())?];
    s.read_exact(&mut der).await.map_err(|e| e.to_string())?;
    tracker::check_fetched_key(&der, fp).map_err(|e| e.to_string())
}

/// The value of the metrics line starting with `name ` (NaN if absent).
pub fn counter(lines: &[String], name: &str) -> f64 {
    lines
        .iter()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

/// The `q` quantile (0..1), in ms, of the tracker's `anomos_tracker_request_seconds{kind}` histogram between two
/// scrapes (`before`, `after`: metrics lines), interpolated within its bucket as Prometheus'
/// `histogram_quantile` does; NaN without requests. A quantile past the last finite bound reads as that bound.
pub fn tracker_quantile_ms(before: &[String], after: &[String], kind: &str, q: f64) -> f64 {
    let buckets = |lines: &[String]| -> Vec<(f64, f64)> {
        let prefix = format!("anomos_tracker_request_seconds_bucket{{kind=\"{kind}\",le=\"");
        let mut v: Vec<(f64, f64)> = lines
            .iter()
            .filter_map(|l| l.strip_prefix(&prefix))
            .filter_map(|rest| {
                let (le, count) = rest.split_once("\"} ")?;
                let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
                Some((le, count.trim().parse().ok()?))
            })
            .collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v
    };
    let (b0, b1) = (buckets(before), buckets(after));
    let delta: Vec<(f64, f64)> =
        b1.iter().map(|(le, n)| (*le, n - b0.iter().find(|(l, _)| l == le).map_or(0.0, |(_, m)| *m))).collect();
    let total = delta.last().map_or(0.0, |(_, n)| *n);
    if total <= 0.0 {
        return f64::NAN;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for (le, n) in delta {
        if n >= rank {
            if le.is_infinite() {
                return lower * 1000.0;
            }
            let within = if n > below { (rank - below) / (n - below) } else { 1.0 };
            return (lower + (le - lower) * within) * 1000.0;
        }
        (lower, below) = (le, n);
    }
    f64::NAN
}
