//! Prometheus metrics of the tracker and, through this crate, of the peer: exposition by `prometheus-client`
//! (the Prometheus project's Rust client) in the text format 0.0.4, served over HTTP/1.1 by `hyper`.
//!
//! * Metrics are registered in a [`Registry`]: counters incremented where their event happens are the crate's
//!   [`Counter`] and [`EnumCounter`] (a counter per value of a label enum); values that are read at scrape time
//!   (gauges of the node's state, the peer's counters kept in its own `Stats`) come from a [`Collector`] that
//!   writes them with [`counter`], [`gauge`], [`counter_by`] and [`gauge_by`].
//! * Label sets are enums ([`LabelEnum`]): the protocol's own reason codes (`DenyReason`, `BreakReason` of
//!   `anomos_proto::cell`) and the tracker's [`Refusal`] and [`ReportKind`]. Every value of an enum is exposed from
//!   the start (0 until seen), so a dashboard's series exist before the first event.
//! * The responder answers exactly one path, `GET /metrics` (also `HEAD`), with `200`; any other path gets `404`,
//!   any other method `405`; a malformed request `400` and an oversized one `431` (hyper's answers). Requests are
//!   read with a bound ([`MAX_REQUEST`] bytes of request line and headers) and a deadline ([`REQUEST_TIMEOUT`]);
//!   at most [`MAX_CONNS`] scrapes are served at once (more are closed). Every connection is closed after one
//!   answer.
//!
//! A metrics address that is not loopback is refused unless the operator explicitly allows it
//! (`--metrics-allow-remote`): the numbers describe a node's traffic (links, circuits, bytes), which is worth
//! hiding from the world. See [`check_addr`].

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Debug;
use std::hash::Hash;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anomos_proto::cell::{BreakReason, DenyReason};
use anomos_proto::tracker::FailureKind;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, LabelSetEncoder};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

pub use prometheus_client::collector::Collector;
pub use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
pub use prometheus_client::encoding::DescriptorEncoder;
pub use prometheus_client::metrics::counter::Counter;
pub use prometheus_client::registry::Registry;

/// Most bytes of request line and headers read from a scraper (hyper's smallest read buffer).
pub const MAX_REQUEST: usize = 8 * 1024;
/// Time a scraper has to send its request (and to read the answer).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Most scrapes served at once.
pub const MAX_CONNS: usize = 16;

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

/// An enum whose values are the values of one metric label.
pub trait LabelEnum: Copy + Eq + Hash + Debug + Send + Sync + 'static {
    /// The label's name.
    const KEY: &'static str;
    /// Every value, in exposition order.
    fn all() -> &'static [Self];
    /// The label value (stable: dashboards and alerts name it).
    fn as_str(self) -> &'static str;
}

/// The label set of one [`LabelEnum`] value: `{KEY="value"}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Label<E>(pub E);

impl<E: LabelEnum> EncodeLabelSet for Label<E> {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> std::fmt::Result {
        [(E::KEY, self.0.as_str())].encode(encoder)
    }
}

/// The protocol's DENY reasons, `reason` label. `Other` (a code this version does not know) is `other`.
impl LabelEnum for DenyReason {
    const KEY: &'static str = "reason";
    fn all() -> &'static [Self] {
        // Bounds: evaluated at compile time, where an out-of-range index is a build error, not a panic.
        #[allow(clippy::indexing_slicing)]
        const ALL: &[DenyReason] = &{
            let mut all = [DenyReason::Other(0); DenyReason::KNOWN.len() + 1];
            let mut i = 0;
            while i < DenyReason::KNOWN.len() {
                all[i] = DenyReason::KNOWN[i];
                i += 1;
            }
            all
        };
        ALL
    }
    fn as_str(self) -> &'static str {
        DenyReason::as_str(self)
    }
}

/// The protocol's BREAK reasons, `reason` label. `Other` (a code this version does not know) is `other`.
impl LabelEnum for BreakReason {
    const KEY: &'static str = "reason";
    fn all() -> &'static [Self] {
        // Bounds: evaluated at compile time, where an out-of-range index is a build error, not a panic.
        #[allow(clippy::indexing_slicing)]
        const ALL: &[BreakReason] = &{
            let mut all = [BreakReason::Other(0); BreakReason::KNOWN.len() + 1];
            let mut i = 0;
            while i < BreakReason::KNOWN.len() {
                all[i] = BreakReason::KNOWN[i];
                i += 1;
            }
            all
        };
        ALL
    }
    fn as_str(self) -> &'static str {
        BreakReason::as_str(self)
    }
}

/// Defines a label enum: its variants with their label values, and its [`LabelEnum`] implementation.
#[macro_export]
macro_rules! label_enum {
    ($(#[$m:meta])* $name:ident, $key:literal { $($(#[$vm:meta])* $v:ident => $s:literal),* $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vm])* $v,)*
        }
        impl $crate::metrics::LabelEnum for $name {
            const KEY: &'static str = $key;
            fn all() -> &'static [Self] {
                &[$($name::$v,)*]
            }
            fn as_str(self) -> &'static str {
                match self { $($name::$v => $s,)* }
            }
        }
    };
}

crate::label_enum!(
    /// Why the tracker refused a connection or request (`anomos_tracker_refused_total`).
    Refusal, "reason" {
        /// Too many live identities on the announce's address or prefix (`ErrorCode::AddressLimit`).
        AddressLimit => "address-limit",
        /// A malformed or out-of-range request (`ErrorCode::BadRequest`).
        BadRequest => "bad-request",
        /// An announce for an address other than the session's source.
        ForeignAddress => "foreign-address",
        /// At a capacity limit (`ErrorCode::Full`).
        Full => "full",
        /// A source address over its ClientHello rate.
        HelloRate => "hello-rate",
        /// A session handshake that failed (bad Hello, signature, timeout).
        Handshake => "handshake",
        /// A connection closed before its RSA work: too many channel set-ups in progress.
        HandshakeBusy => "handshake-busy",
        /// No path could be built (`ErrorCode::NoPath`).
        NoPath => "no-path",
        /// An announce that needed a reachability probe found every probe slot busy (`ErrorCode::Full`).
        ProbeBusy => "probe-busy",
        /// A reporter over its failure-report rate.
        ReportRate => "report-rate",
        /// All connections in use (`--max-connections`; the label predates session resumption).
        SessionLimit => "session-limit",
        /// The source address' connections all in use (`--max-sessions-per-ip`).
        SessionLimitPerIp => "session-limit-per-ip",
        /// A replica that cannot serve: cut off from etcd, or its changes kept conflicting (`ErrorCode::Unavailable`).
        Unavailable => "unavailable",
        /// A request from a peer that has not announced (`ErrorCode::UnknownPeer`).
        UnknownPeer => "unknown-peer",
        /// A resumption with a ticket the tracker does not hold (expired, evicted, or from before a restart): the
        /// peer does a full handshake.
        UnknownTicket => "unknown-ticket",
        /// The announced address failed the probe (`ErrorCode::Unreachable`).
        Unreachable => "unreachable",
        /// An announced address that cannot be used (unspecified, multicast, ...).
        UnusableAddress => "unusable-address",
    }
);

crate::label_enum!(
    /// The kind of a failure report (`anomos_tracker_reports_total`): the protocol's `FailureKind` without its
    /// reason code.
    ReportKind, "kind" {
        /// `FailureKind::CircuitBroken`.
        CircuitBroken => "circuit-broken",
        /// `FailureKind::CircuitDenied`.
        CircuitDenied => "circuit-denied",
        /// `FailureKind::Misbehaving`.
        Misbehaving => "misbehaving",
        /// `FailureKind::NeighborUnreachable`.
        NeighborUnreachable => "neighbor-unreachable",
    }
);

crate::label_enum!(
    /// The kind of a request on an authenticated session (`anomos_tracker_request_seconds`).
    RequestKind, "kind" {
        /// `Announce`.
        Announce => "announce",
        /// `RequestCircuits`.
        Circuits => "circuits",
        /// `Report`.
        Report => "report",
        /// `Resumable` (a session ticket), a `Hello` after the session's, and every request refused as malformed.
        Other => "other",
    }
);

impl From<&FailureKind> for ReportKind {
    fn from(k: &FailureKind) -> Self {
        match k {
            FailureKind::NeighborUnreachable => ReportKind::NeighborUnreachable,
            FailureKind::CircuitDenied(_) => ReportKind::CircuitDenied,
            FailureKind::CircuitBroken(_) => ReportKind::CircuitBroken,
            FailureKind::Misbehaving => ReportKind::Misbehaving,
        }
    }
}

/// A counter per value of a label enum, every value present from the start.
#[derive(Debug, Clone)]
pub struct EnumCounter<E: LabelEnum>(Family<Label<E>, Counter>);

impl<E: LabelEnum> Default for EnumCounter<E> {
    fn default() -> Self {
        let family = Family::default();
        for v in E::all() {
            drop(family.get_or_create(&Label(*v)));
        }
        EnumCounter(family)
    }
}

impl<E: LabelEnum> EnumCounter<E> {
    /// Adds one for `v`.
    pub fn inc(&self, v: E) {
        self.0.get_or_create(&Label(v)).inc();
    }

    /// The count for `v`.
    pub fn get(&self, v: E) -> u64 {
        self.0.get(&Label(v)).map_or(0, |c| c.get())
    }

    /// Registers the family as `name` (a counter: the exposition appends `_total`).
    pub fn register(&self, registry: &mut Registry, name: &str, help: &str) {
        registry.register(name, help, self.0.clone());
    }
}

/// The bounds (seconds) of [`EnumHistogram`]'s buckets: from 1 ms, fine around the 20 ms a tracker request
/// should take at most, up to the peers' 15 s read timeout.
pub const LATENCY_BUCKETS: [f64; 14] =
    [0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 15.0];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// A latency histogram per value of a label enum (buckets [`LATENCY_BUCKETS`]), every value present from the start.
#[derive(Debug, Clone)]
pub struct EnumHistogram<E: LabelEnum>(Family<Label<E>, Histogram, fn() -> Histogram>);

impl<E: LabelEnum> Default for EnumHistogram<E> {
    fn default() -> Self {
        let family = Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        for v in E::all() {
            drop(family.get_or_create(&Label(*v)));
        }
        EnumHistogram(family)
    }
}

impl<E: LabelEnum> EnumHistogram<E> {
    /// Records a duration for `v`.
    pub fn observe(&self, v: E, took: Duration) {
        self.0.get_or_create(&Label(v)).observe(took.as_secs_f64());
    }

    /// Registers the family as `name`.
    pub fn register(&self, registry: &mut Registry, name: &str, help: &str) {
        registry.register(name, help, self.0.clone());
    }
}

/// Counters keyed by a label string: the peer's DENY and BREAK counts (`Stats` in the peer's `node.rs`, which
/// counts by the reasons' `as_str`). The peer's collector reads them per value of the protocol's reason enums.
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

    /// The counts per value of `E` (by its label value), every value present.
    pub fn by<E: LabelEnum>(&self) -> Vec<(Label<E>, u64)> {
        let m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        E::all().iter().map(|v| (Label(*v), m.get(v.as_str()).copied().unwrap_or(0))).collect()
    }
}

/// A collector's counter read at scrape time: `name` without `_total` (the exposition appends it).
pub fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    ConstCounter::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Counter)?)
}

/// A collector's gauge read at scrape time.
pub fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    ConstGauge::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

/// A collector's labelled counter family (`name` without `_total`).
pub fn counter_by<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (L, u64)>,
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in values {
        ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A collector's labelled gauge family.
pub fn gauge_by<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (L, u64)>,
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in values {
        ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// The text exposition (format 0.0.4) of `registry`.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, registry) {
        // Our collectors only fail when the writer does, and a String never does.
        warn!("metrics encoding failed: {e}");
    }
    out
}

/// Binds `addr` and serves `registry` on `GET /metrics` until the task is dropped. Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    registry: Arc<Registry>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
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
            let registry = registry.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let service = hyper::service::service_fn(move |req| {
                    let answer = answer(&req, &registry);
                    async move { Ok::<_, Infallible>(answer) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(REQUEST_TIMEOUT)
                    .max_buf_size(MAX_REQUEST)
                    .keep_alive(false)
                    .serve_connection(hyper_util::rt::TokioIo::new(s), service);
                match tokio::time::timeout(REQUEST_TIMEOUT, conn).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => debug!(%remote, "metrics scrape dropped: {e}"),
                    Err(_) => debug!(%remote, "metrics scrape dropped: too slow"),
                }
            });
        }
    });
    Ok((bound, task))
}

/// The answer to one request.
fn answer(req: &Request<Incoming>, registry: &Registry) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
        *r.status_mut() = status;
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("text/plain"));
        r
    };
    match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => {
            let mut r = Response::new(Full::new(Bytes::from(encode(registry))));
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(CONTENT_TYPE));
            r
        }
        (&Method::GET | &Method::HEAD, _) => text(StatusCode::NOT_FOUND, "not found\n"),
        _ => {
            let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET /metrics\n");
            r.headers_mut().insert(hyper::header::ALLOW, hyper::header::HeaderValue::from_static("GET, HEAD"));
            r
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    #[derive(Debug)]
    struct Fixed;

    impl Collector for Fixed {
        fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
            counter(&mut enc, "x", "Things.\nMore", 3)?;
            gauge_by(&mut enc, "y", "Y", DenyReason::KNOWN[..2].iter().map(|r| (Label(*r), 2)))
        }
    }

    #[test]
    fn exposition_has_help_type_and_enum_labels() {
        let mut reg = Registry::default();
        reg.register_collector(Box::new(Fixed));
        let refused = EnumCounter::<Refusal>::default();
        refused.register(&mut reg, "refused", "Refused");
        refused.inc(Refusal::Full);
        assert_eq!(refused.get(Refusal::Full), 1);
        let t = encode(&reg);
        // A family's series come in no particular order; each value of the enum is there, 0 until counted.
        assert!(t.contains("# HELP refused_total Refused.\n# TYPE refused_total counter\nrefused_total{"), "{t}");
        assert!(t.contains("refused_total{reason=\"bad-request\"} 0\n"), "{t}");
        assert!(t.contains("refused_total{reason=\"full\"} 1\n"), "{t}");
        assert_eq!(t.matches("refused_total{").count(), Refusal::all().len(), "{t}");
        assert!(
            t.contains(
                "# HELP x_total Things.\\nMore\n# TYPE x_total counter\nx_total 3\n# HELP y Y\n# TYPE y gauge\n\
                 y{reason=\"bad-tc\"} 2\ny{reason=\"expired\"} 2\n"
            ),
            "{t}"
        );
    }

    #[test]
    fn latency_histograms_count_each_request_in_its_bucket() {
        let mut reg = Registry::default();
        let h = EnumHistogram::<RequestKind>::default();
        h.register(&mut reg, "req_seconds", "Req");
        h.observe(RequestKind::Circuits, Duration::from_millis(3));
        h.observe(RequestKind::Circuits, Duration::from_millis(30));
        h.observe(RequestKind::Circuits, Duration::from_secs(20));
        let t = encode(&reg);
        let c = |le: &str| format!("req_seconds_bucket{{kind=\"circuits\",le=\"{le}\"}} ");
        assert!(t.contains("# TYPE req_seconds histogram\n"), "{t}");
        assert!(t.contains(&(c("0.002") + "0\n")) && t.contains(&(c("0.005") + "1\n")), "{t}");
        assert!(t.contains(&(c("0.03") + "2\n")) && t.contains(&(c("15") + "2\n")), "{t}");
        assert!(t.contains(&(c("+Inf") + "3\n")), "{t}");
        // Every kind is there before its first request.
        assert!(t.contains("req_seconds_count{kind=\"announce\"} 0\n"), "{t}");
    }

    #[test]
    fn protocol_reason_labels_cover_every_code() {
        assert_eq!(<DenyReason as LabelEnum>::all().len(), DenyReason::KNOWN.len() + 1);
        assert_eq!(<BreakReason as LabelEnum>::all().last().map(|r| LabelEnum::as_str(*r)), Some("other"));
        let c = LabeledCounter::default();
        c.inc(BreakReason::Timeout.as_str());
        c.inc(BreakReason::Other(77).as_str());
        let by = c.by::<BreakReason>();
        assert_eq!(by.len(), BreakReason::KNOWN.len() + 1);
        assert!(by.contains(&(Label(BreakReason::Timeout), 1)) && by.contains(&(Label(BreakReason::Other(0)), 1)));
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
        let mut reg = Registry::default();
        let c = Counter::<u64>::default();
        reg.register("a", "A", c.clone());
        c.inc();
        let (addr, task) = serve("127.0.0.1:0".parse().unwrap(), Arc::new(reg)).await.unwrap();
        let ok = get(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        let body = "# HELP a_total A.\n# TYPE a_total counter\na_total 1\n";
        assert!(ok.to_lowercase().contains(&format!("content-length: {}\r\n", body.len())), "{ok}");
        assert!(ok.contains(CONTENT_TYPE) && ok.ends_with(&format!("\r\n\r\n{body}")), "{ok}");
        let head = get(addr, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n") && head.ends_with("\r\n\r\n"), "{head}");
        assert!(get(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.starts_with("HTTP/1.1 404"));
        assert!(get(addr, b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.starts_with("HTTP/1.1 405"));
        assert!(get(addr, b"garbage\r\n\r\n").await.starts_with("HTTP/1.1 400"));
        let huge = [b"GET /metrics HTTP/1.1\r\nX: ".as_slice(), &vec![b'a'; MAX_REQUEST * 2]].concat();
        let mut s = TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(&huge).await;
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        assert!(out.starts_with("HTTP/1.1 431"), "{out}");
        task.abort();
    }
}
