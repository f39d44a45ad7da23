//! Prometheus text exposition (format 0.0.4) and the small HTTP/1.x responder that serves it.
//!
//! Used by the tracker and, through this crate, by the peer. The responder answers exactly one path,
//! `GET /metrics` (also `HEAD`), with `200`; any other path gets `404`, any other method `405`. Requests are read
//! with a bound ([`MAX_REQUEST`] bytes of request line and headers) and a deadline ([`REQUEST_TIMEOUT`]); at most
//! [`MAX_CONNS`] scrapes are served at once (more are closed). Every connection is closed after one answer.
//!
//! A metrics address that is not loopback is refused unless the operator explicitly allows it
//! (`--metrics-allow-remote`): the numbers describe a node's traffic (links, circuits, bytes), which is worth
//! hiding from the world. See [`check_addr`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

/// Most bytes of request line and headers read from a scraper.
pub const MAX_REQUEST: usize = 8 * 1024;
/// Time a scraper has to send its request (and to read the answer).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Most scrapes served at once.
pub const MAX_CONNS: usize = 16;

/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Refuses a metrics address that is not loopback unless `allow_remote` (the `--metrics-allow-remote` flag).
pub fn check_addr(addr: SocketAddr, allow_remote: bool) -> Result<(), String> {
    if addr.ip().is_loopback() || allow_remote {
        if !addr.ip().is_loopback() {
            warn!(%addr, "metrics are served on a non-loopback address: anyone who can reach it sees this node's traffic counters");
        }
        Ok(())
    } else {
        Err(format!(
            "--metrics {addr}: not a loopback address; the counters describe this node's traffic. Serve them on \
             127.0.0.1 (and scrape through a tunnel), or pass --metrics-allow-remote"
        ))
    }
}

/// A metric's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Monotonic.
    Counter,
    /// Goes up and down.
    Gauge,
}

/// Builds one text exposition: families with `# HELP` and `# TYPE` lines, then their samples.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

/// Escapes a label value (backslash, double quote, newline).
pub fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

impl Exposition {
    /// An empty exposition.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a family: its `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Self {
        let t = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {t}");
        self
    }

    /// One sample of the current family.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        if value.fract() == 0.0 && value.abs() < 1e15 {
            let _ = writeln!(self.out, " {}", value as i64);
        } else {
            let _ = writeln!(self.out, " {value}");
        }
        self
    }

    /// A family with one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: f64) -> &mut Self {
        self.family(name, kind, help).sample(name, &[], value)
    }

    /// A family with one sample per value of `label`.
    pub fn by_label(
        &mut self,
        name: &str,
        kind: Kind,
        help: &str,
        label: &str,
        values: impl IntoIterator<Item = (String, f64)>,
    ) -> &mut Self {
        self.family(name, kind, help);
        for (v, n) in values {
            self.sample(name, &[(label, &v)], n);
        }
        self
    }

    /// The text.
    pub fn finish(self) -> String {
        self.out
    }
}

/// Counters keyed by a label value (e.g. a refusal reason), for [`Exposition::by_label`].
#[derive(Debug, Default)]
pub struct LabeledCounter(Mutex<BTreeMap<String, u64>>);

impl LabeledCounter {
    /// Adds one for `label`.
    pub fn inc(&self, label: &str) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match m.get_mut(label) {
            Some(n) => *n += 1,
            None => {
                m.insert(label.to_string(), 1);
            }
        }
    }

    /// The count for `label`.
    pub fn get(&self, label: &str) -> u64 {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).get(label).copied().unwrap_or(0)
    }

    /// Every label seen, with its count, plus `always` (with 0 if never seen), sorted.
    pub fn snapshot(&self, always: &[&str]) -> Vec<(String, f64)> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for a in always {
            m.entry((*a).to_string()).or_insert(0);
        }
        m.into_iter().map(|(k, v)| (k, v as f64)).collect()
    }
}

/// A plain monotonic counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }
    /// The value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// What renders the exposition for each scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Binds `addr` and serves `render()` on `GET /metrics` until the task is dropped. Returns the bound address.
pub async fn serve(addr: SocketAddr, render: Render) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    info!(addr = %bound, "metrics served at http://{bound}/metrics");
    let conns = Arc::new(tokio::sync::Semaphore::new(MAX_CONNS));
    let task = tokio::spawn(async move {
        loop {
            let (s, remote) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    warn!("metrics accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = conns.clone().try_acquire_owned() else {
                debug!(%remote, "metrics: too many scrapes at once; connection closed");
                continue;
            };
            let render = render.clone();
            tokio::spawn(async move {
                let _permit = permit;
                if let Err(e) = tokio::time::timeout(REQUEST_TIMEOUT, answer(s, &render))
                    .await
                    .unwrap_or_else(|_| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "scrape too slow")))
                {
                    debug!(%remote, "metrics scrape dropped: {e}");
                }
            });
        }
    });
    Ok((bound, task))
}

/// Reads one request (bounded) and answers it.
async fn answer(mut s: TcpStream, render: &Render) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            break;
        }
        if buf.len() >= MAX_REQUEST {
            return respond(&mut s, "431 Request Header Fields Too Large", "text/plain", b"request too large\n", true)
                .await;
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    if !version.is_some_and(|v| v.starts_with("HTTP/1.")) {
        return respond(&mut s, "400 Bad Request", "text/plain", b"bad request\n", true).await;
    }
    let path = target.unwrap_or("").split('?').next().unwrap_or("");
    let head = method == Some("HEAD");
    match (method, path) {
        (Some("GET" | "HEAD"), "/metrics") => {
            let body = render();
            respond(&mut s, "200 OK", CONTENT_TYPE, body.as_bytes(), !head).await
        }
        (Some("GET" | "HEAD"), _) => respond(&mut s, "404 Not Found", "text/plain", b"not found\n", !head).await,
        _ => respond(&mut s, "405 Method Not Allowed", "text/plain", b"only GET /metrics\n", true).await,
    }
}

async fn respond(s: &mut TcpStream, status: &str, ctype: &str, body: &[u8], with_body: bool) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    if with_body {
        s.write_all(body).await?;
    }
    s.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_help_type_and_escaped_labels() {
        let mut e = Exposition::new();
        e.single("x_total", Kind::Counter, "Things.\nMore", 3.0);
        e.by_label("y", Kind::Gauge, "Y", "reason", vec![("a\"b\\c\nd".to_string(), 1.5)]);
        let t = e.finish();
        assert_eq!(
            t,
            "# HELP x_total Things.\\nMore\n# TYPE x_total counter\nx_total 3\n# HELP y Y\n# TYPE y gauge\n\
             y{reason=\"a\\\"b\\\\c\\nd\"} 1.5\n"
        );
    }

    #[test]
    fn non_loopback_needs_the_flag() {
        assert!(check_addr("127.0.0.1:9000".parse().unwrap(), false).is_ok());
        assert!(check_addr("[::1]:9000".parse().unwrap(), false).is_ok());
        assert!(check_addr("0.0.0.0:9000".parse().unwrap(), false).is_err());
        assert!(check_addr("0.0.0.0:9000".parse().unwrap(), true).is_ok());
    }

    async fn get(addr: SocketAddr, req: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(req).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_one_path_and_bounds_requests() {
        let render: Render = Arc::new(|| "a 1\n".to_string());
        let (addr, task) = serve("127.0.0.1:0".parse().unwrap(), render).await.unwrap();
        let ok = get(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("Content-Length: 4\r\n") && ok.ends_with("\r\n\r\na 1\n"), "{ok}");
        assert!(get(addr, b"GET / HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 404"));
        assert!(get(addr, b"POST /metrics HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 405"));
        assert!(get(addr, b"garbage\r\n\r\n").await.starts_with("HTTP/1.1 400"));
        let huge = vec![b'a'; MAX_REQUEST * 2];
        let mut s = TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(&huge).await;
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        assert!(out.starts_with("HTTP/1.1 431"), "{out}");
        task.abort();
    }
}
