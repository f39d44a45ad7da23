//! Command-line / embedding configuration of the tracker.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::diversity::AdmissionLimits;
use crate::error::TrackerError;
use crate::graph::GraphConfig;

/// Largest `--neighbors`: the degree cap (target + 2) must fit an announce reply (`MAX_NEIGHBORS`).
pub const MAX_TARGET_DEGREE: usize = anomos_proto::tracker::MAX_NEIGHBORS - 2;

/// How many missed announce intervals make a peer expire.
pub const EXPIRE_INTERVALS: u32 = 3;

/// Longest interval `--announce-rate` grows the announce interval to (the peer's client accepts up to 3600 s).
pub const MAX_GROWN_INTERVAL: u32 = 3600;

/// Everything the tracker is configured with. Embeddable in another clap command with `#[command(flatten)]`.
#[derive(clap::Args, Debug, Clone)]
pub struct TrackerArgs {
    /// Address to listen on for peers (port 0 picks a free port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7700")]
    pub listen: SocketAddr,

    /// Directory holding the tracker's identity key `tracker.key` (created with mode 0700).
    #[arg(long, value_name = "DIR", default_value = "./anomos-tracker-data")]
    pub data_dir: PathBuf,

    /// RSA modulus size in bits when a new identity key is created (2048 or 3072).
    #[arg(long, value_name = "BITS", default_value_t = 2048, value_parser = parse_key_bits)]
    pub key_bits: usize,

    /// Target number of neighbors per peer (1..=30); a peer accepts up to this + 2. The tracker raises it to
    /// ⌈ln N⌉ for an overlay of N peers (so paths keep reaching rarely served chains), unless --fixed-degree.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = parse_degree)]
    pub neighbors: usize,

    /// Keep --neighbors whatever the overlay's size.
    #[arg(long)]
    pub fixed_degree: bool,

    /// Most live peers admitted per IPv4 address; a further new identity is refused with `AddressLimit`
    /// (0: no limit). Not applied with --allow-same-ip.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub max_per_ipv4: usize,

    /// Most live peers admitted per IPv4 /24 (0: no limit). Not applied with --allow-same-ip.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub max_per_ipv4_24: usize,

    /// Most live peers admitted per IPv6 /64, IPv6's "address" (0: no limit). Not applied with --allow-same-ip.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub max_per_ipv6_64: usize,

    /// Most live peers admitted per IPv6 /48 (0: no limit). Not applied with --allow-same-ip.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub max_per_ipv6_48: usize,

    /// Announce interval handed to peers, in seconds, while the overlay is small; a peer silent for 3 of the
    /// intervals it was handed expires. A large overlay is handed a longer one (--announce-rate).
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=86_400))]
    pub interval: u32,

    /// Most steady announces a second the overlay is asked for: with N peers the interval handed out is
    /// max(--interval, ⌈N / this⌉ s, at most 3600 s), so the steady announces of a large overlay take a bounded
    /// share of the tracker (1,000 a second: 20–40 % of a core; 100,000 peers announce every 100 s).
    /// 0: always --interval. Replicas (--etcd) always hand out --interval.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub announce_rate: u32,

    /// Allow peers on the same IP address to be neighbors (needed when everything runs on loopback). Also lifts
    /// the --max-per-* admission limits and lets paths hold two hops of one /16 when no other path exists.
    #[arg(long)]
    pub allow_same_ip: bool,

    /// Accept announces of a listen address other than the one the session comes from (e.g. peers behind
    /// a NAT that announce their public address from a private one). Off by default: otherwise the
    /// reachability probe could be pointed at third parties.
    #[arg(long)]
    pub allow_foreign_announce: bool,

    /// Most announced peers kept at once; new peers beyond it are refused with `Full`. The session limit and
    /// the open-file limit the tracker sets at start follow from it.
    #[arg(long, value_name = "N", default_value_t = 100_000, value_parser = parse_positive)]
    pub max_peers: usize,

    /// Most issued circuits remembered for failure reports (the oldest is forgotten first).
    #[arg(long, value_name = "N", default_value_t = 100_000, value_parser = parse_positive)]
    pub max_pending_circuits: usize,

    /// Most sessions kept resumable (session tickets, in memory: no descriptor each); past it the least recently
    /// used is dropped and its peer does a full handshake next time [default: --max-peers + 1024].
    #[arg(long, value_name = "N", value_parser = parse_positive)]
    pub max_sessions: Option<usize>,

    /// Most concurrent peer connections (one descriptor each); more are closed at once [default: --max-peers / 10
    /// + 1024: a peer that resumes its session holds a connection only for a few seconds per announce].
    #[arg(long, value_name = "N", value_parser = parse_positive)]
    pub max_connections: Option<usize>,

    /// Seconds a connection whose session has a ticket may sit without a request before the tracker closes it
    /// (the session stays resumable for --idle-timeout).
    #[arg(long, value_name = "SECS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub conn_idle_timeout: u64,

    /// Most concurrent connections from one IP address (an IPv6 /64 counts as one); more are closed at once (a
    /// single-host test overlay needs about 4 per peer).
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = parse_positive)]
    pub max_sessions_per_ip: usize,

    /// Channel set-ups (each costs an RSA decryption) per second allowed from one IP address (an IPv6 /64 counts
    /// as one); connections beyond it (and --hello-burst) are closed before any RSA work.
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub hello_rate: u32,

    /// Burst of channel set-ups allowed from one IP address (or IPv6 /64) above --hello-rate.
    #[arg(long, value_name = "N", default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    pub hello_burst: u32,

    /// Seconds a connection has from connecting to a verified Hello (slow or silent ones are closed).
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub hello_timeout: u64,

    /// Seconds an authenticated session may sit unused: a ticket expires after this long without a connection
    /// using it, and a connection of a session without a ticket is closed after this long without a request
    /// [default: 2 × the longest interval handed out + 30 (--interval, --announce-rate, --max-peers), so a
    /// peer's session outlives the wait between two of its announces].
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub idle_timeout: Option<u64>,

    /// Seconds a requester's failure report keeps the peer it blames out of that requester's paths (and, with a
    /// second reporter's, out of everyone's); the blamed peer's announces do not end it.
    #[arg(long, value_name = "SECS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub blame_secs: u64,

    /// Lifetime of issued tracking codes, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub tc_ttl: u64,

    /// Serve Prometheus metrics (GET /metrics, text format) on this address, e.g. 127.0.0.1:9100
    /// [default: off]. Only loopback addresses, unless --metrics-allow-remote.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,

    /// Allow --metrics on a non-loopback address (the counters describe the overlay's traffic; anyone who
    /// can reach the port sees them).
    #[arg(long)]
    pub metrics_allow_remote: bool,

    /// Run as one of several replicas sharing one state through etcd, at these endpoints (comma-separated, e.g.
    /// http://10.0.0.5:2379,http://10.0.0.6:2379) [default: off, the state is in <data-dir>/tracker.redb]. Every
    /// replica needs the same tracker.key; peers list every replica's address in --tracker. Needs a tracker
    /// built with `--features etcd`.
    #[arg(long, value_name = "URLS", value_delimiter = ',')]
    pub etcd: Vec<String>,

    /// Key prefix of the shared state in etcd (one etcd can hold several overlays under different prefixes).
    #[arg(long, value_name = "PREFIX", default_value = "/anomos/tracker/")]
    pub etcd_prefix: String,
}

fn parse_key_bits(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(b) if anomos_proto::identity::ALLOWED_KEY_BITS.contains(&b) => Ok(b),
        _ => Err(format!("{s:?}: must be 2048 or 3072")),
    }
}

fn parse_degree(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_TARGET_DEGREE).contains(&n) => Ok(n),
        _ => Err(format!("{s:?}: must be 1..={MAX_TARGET_DEGREE}")),
    }
}

fn parse_positive(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{s:?}: must be a positive integer")),
    }
}

impl Default for TrackerArgs {
    /// The same values as an empty command line.
    fn default() -> Self {
        #[derive(clap::Parser)]
        struct Defaults {
            #[command(flatten)]
            args: TrackerArgs,
        }
        <Defaults as clap::Parser>::parse_from(["anomos-tracker"]).args
    }
}

impl TrackerArgs {
    /// Range checks (clap enforces them on the command line; this covers values set in code).
    pub fn validate(&self) -> Result<(), TrackerError> {
        let bad = |m: String| Err(TrackerError::Config(m));
        if !anomos_proto::identity::ALLOWED_KEY_BITS.contains(&self.key_bits) {
            return bad(format!("--key-bits {}: must be 2048 or 3072", self.key_bits));
        }
        if !(1..=MAX_TARGET_DEGREE).contains(&self.neighbors) {
            return bad(format!("--neighbors {}: must be 1..={MAX_TARGET_DEGREE}", self.neighbors));
        }
        if self.tc_ttl < 60 {
            return bad(format!(
                "--tc-ttl {}: at least 60 seconds (layer expiries are jittered by up to 20 s)",
                self.tc_ttl
            ));
        }
        if self.interval == 0 || self.tc_ttl == 0 {
            return bad("--interval and --tc-ttl must be positive".into());
        }
        if self.max_peers == 0
            || self.max_pending_circuits == 0
            || self.max_sessions == Some(0)
            || self.max_connections == Some(0)
        {
            return bad(
                "--max-peers, --max-pending-circuits, --max-sessions and --max-connections must be positive".into()
            );
        }
        if self.max_sessions_per_ip == 0 || self.hello_rate == 0 || self.hello_burst == 0 {
            return bad("--max-sessions-per-ip, --hello-rate and --hello-burst must be positive".into());
        }
        if self.hello_timeout == 0 || self.idle_timeout == Some(0) || self.conn_idle_timeout == 0 {
            return bad("--hello-timeout, --idle-timeout and --conn-idle-timeout must be positive".into());
        }
        if let Some(addr) = self.metrics {
            crate::metrics::check_addr(addr, self.metrics_allow_remote).map_err(TrackerError::Config)?;
        }
        if !self.etcd.is_empty() {
            if !cfg!(feature = "etcd") {
                return bad("--etcd: this anomos-tracker was built without etcd support (build it with `cargo \
                            build --release -p anomos-tracker --features etcd`)"
                    .into());
            }
            if let Some(e) = self.etcd.iter().find(|e| !e.starts_with("http://")) {
                return bad(format!(
                    "--etcd {e:?}: an endpoint URL http://HOST:PORT expected (this build speaks no TLS to etcd: keep \
                     etcd on a private network, docs/OPERATORS.md)"
                ));
            }
            if !self.etcd_prefix.starts_with('/') || !self.etcd_prefix.ends_with('/') {
                return bad(format!("--etcd-prefix {:?}: must start and end with '/'", self.etcd_prefix));
            }
        }
        Ok(())
    }

    /// Whether the state is shared with other replicas through etcd (`--etcd`).
    pub fn replicated(&self) -> bool {
        !self.etcd.is_empty()
    }

    /// Most sessions kept resumable (tickets): `--max-sessions`, or `--max-peers` + 1024.
    pub fn sessions_limit(&self) -> usize {
        self.max_sessions.unwrap_or_else(|| self.max_peers.saturating_add(1024))
    }

    /// Most concurrent peer connections: `--max-connections`, or `--max-peers` / 10 + 1024. At the default 30 s
    /// interval 100,000 peers make 3,333 announces a second; a peer that resumes holds its connection for the
    /// announce and at most a few seconds after (`--conn-idle-timeout`; the reference peer closes after 2 s), so
    /// about 7,000–17,000 are open at once, joins and key fetches included.
    pub fn connections_limit(&self) -> usize {
        self.max_connections.unwrap_or_else(|| (self.max_peers / 10).saturating_add(1024))
    }

    /// How long a connection of a session with a ticket may sit without a request (`--conn-idle-timeout`).
    pub fn conn_idle(&self) -> Duration {
        Duration::from_secs(self.conn_idle_timeout)
    }

    /// How long an authenticated session may sit without a request: `--idle-timeout`, or 2 × the longest
    /// interval the tracker hands out + 30 s (so a ticket outlives the wait between two announces at any size).
    pub fn idle(&self) -> Duration {
        Duration::from_secs(self.idle_timeout.unwrap_or(2 * u64::from(self.max_interval()) + 30))
    }

    /// The announce interval handed out in an overlay of `peers` peers: `--interval`, or longer once `peers`
    /// announcing at it would make more than `--announce-rate` announces a second (SPEC §3.10 "Interval").
    pub fn interval_for(&self, peers: usize) -> u32 {
        if self.announce_rate == 0 || self.replicated() {
            return self.interval;
        }
        let grown = peers.div_ceil(self.announce_rate as usize).min(MAX_GROWN_INTERVAL as usize) as u32;
        self.interval.max(grown)
    }

    /// The longest interval the tracker can hand out (at `--max-peers` peers).
    pub fn max_interval(&self) -> u32 {
        self.interval_for(self.max_peers)
    }

    /// How long a peer handed `interval` stays live after its announce: [`EXPIRE_INTERVALS`] of them.
    pub fn expire_after_for(interval: u32) -> Duration {
        Duration::from_secs(u64::from(interval) * u64::from(EXPIRE_INTERVALS))
    }

    /// Reachability probes run at once (each holds a descriptor for up to 5 s); announces beyond them wait.
    pub fn probes_limit(&self) -> usize {
        (self.sessions_limit() / 64).clamp(16, 512)
    }

    /// Open files the tracker needs: a descriptor per connection and per running probe, and a margin for the
    /// listeners, the state database, the metrics endpoint and logging. Sessions need none: they resume.
    pub fn files_needed(&self) -> u64 {
        (self.connections_limit() + self.probes_limit() + 256) as u64
    }

    /// The state database (`<data-dir>/tracker.redb`).
    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("tracker.redb")
    }

    /// Where the identity key lives.
    pub fn key_path(&self) -> PathBuf {
        self.data_dir.join("tracker.key")
    }

    /// How long a peer handed `--interval` stays live after its last successful announce (the graph's default;
    /// a peer handed a longer interval stays live for 3 of those).
    pub fn expire_after(&self) -> Duration {
        Self::expire_after_for(self.interval)
    }

    /// The graph's configuration (public for the `sybil` simulation, which drives the real graph).
    pub fn graph_config(&self) -> GraphConfig {
        GraphConfig {
            target_degree: self.neighbors,
            max_degree: self.neighbors + 2,
            allow_same_ip: self.allow_same_ip,
            max_peers: self.max_peers,
            expire_after: self.expire_after(),
            admission: AdmissionLimits {
                per_ipv4: self.max_per_ipv4,
                per_ipv4_24: self.max_per_ipv4_24,
                per_ipv6_64: self.max_per_ipv6_64,
                per_ipv6_48: self.max_per_ipv6_48,
            },
            fixed_degree: self.fixed_degree,
            blame_lasts: Duration::from_secs(self.blame_secs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: TrackerArgs,
    }

    #[test]
    fn defaults_match_the_documented_values() {
        let a = TrackerArgs::default();
        assert_eq!(a.listen, "127.0.0.1:7700".parse().unwrap());
        assert_eq!(a.data_dir, PathBuf::from("./anomos-tracker-data"));
        assert_eq!((a.key_bits, a.neighbors, a.interval, a.tc_ttl), (2048, 4, 30, 120));
        assert_eq!((a.max_peers, a.max_pending_circuits, a.max_sessions), (100_000, 100_000, None));
        assert_eq!((a.sessions_limit(), a.probes_limit(), a.files_needed()), (101_024, 512, 11_792));
        assert_eq!((a.max_connections, a.connections_limit(), a.conn_idle()), (None, 11_024, Duration::from_secs(5)));
        assert_eq!((a.max_sessions_per_ip, a.hello_rate, a.hello_burst), (64, 100, 200));
        // 100,000 peers at 1,000 announces a second: a 100 s interval, so tickets live 2 × 100 + 30 s.
        assert_eq!((a.announce_rate, a.max_interval()), (1000, 100));
        assert_eq!((a.hello_timeout, a.idle_timeout, a.idle()), (10, None, Duration::from_secs(230)));
        let small = TrackerArgs { max_peers: 10, interval: 5, ..TrackerArgs::default() };
        assert_eq!((small.sessions_limit(), small.probes_limit(), small.idle()), (1034, 16, Duration::from_secs(40)));
        assert!(!a.allow_same_ip && !a.fixed_degree);
        assert_eq!((a.max_per_ipv4, a.max_per_ipv4_24, a.max_per_ipv6_64, a.max_per_ipv6_48), (2, 16, 2, 16));
        a.validate().unwrap();
        assert_eq!(a.key_path(), PathBuf::from("./anomos-tracker-data/tracker.key"));
    }

    #[test]
    fn the_interval_grows_with_the_overlay_past_the_announce_rate() {
        let a = TrackerArgs::default();
        // Up to 30,000 peers the 30 s interval makes at most 1,000 announces a second.
        for (peers, interval) in [(0, 30), (1, 30), (30_000, 30), (30_001, 31), (50_000, 50), (100_000, 100)] {
            assert_eq!(a.interval_for(peers), interval, "{peers} peers");
        }
        let big = TrackerArgs { max_peers: 10_000_000, ..TrackerArgs::default() };
        assert_eq!((big.interval_for(10_000_000), big.max_interval()), (MAX_GROWN_INTERVAL, MAX_GROWN_INTERVAL));
        let long = TrackerArgs { interval: 7200, ..TrackerArgs::default() };
        assert_eq!(long.interval_for(100_000), 7200, "never shorter than --interval");
        let fixed = TrackerArgs { announce_rate: 0, ..TrackerArgs::default() };
        assert_eq!((fixed.interval_for(100_000), fixed.idle()), (30, Duration::from_secs(90)));
        let replica = TrackerArgs { etcd: vec!["http://127.0.0.1:2379".into()], ..TrackerArgs::default() };
        assert_eq!(replica.interval_for(100_000), 30, "replicas' etcd leases last 3 × --interval");
        assert_eq!(TrackerArgs::expire_after_for(100), Duration::from_secs(300));
    }

    #[test]
    fn out_of_range_values_are_refused() {
        assert!(Cli::try_parse_from(["t", "--key-bits", "1024"]).is_err());
        assert!(Cli::try_parse_from(["t", "--neighbors", "0"]).is_err());
        assert!(Cli::try_parse_from(["t", "--neighbors", "31"]).is_err());
        assert!(Cli::try_parse_from(["t", "--interval", "0"]).is_err());
        assert!(Cli::try_parse_from(["t", "--max-sessions", "0"]).is_err());
        assert!(Cli::try_parse_from(["t", "--max-connections", "0"]).is_err());
        assert!(Cli::try_parse_from(["t", "--conn-idle-timeout", "0"]).is_err());
        let remote = Cli::try_parse_from(["t", "--metrics", "0.0.0.0:9100"]).unwrap();
        assert!(remote.args.validate().is_err(), "a non-loopback metrics address needs the flag");
        let allowed = Cli::try_parse_from(["t", "--metrics", "0.0.0.0:9100", "--metrics-allow-remote"]).unwrap();
        allowed.args.validate().unwrap();
        let ok = Cli::try_parse_from(["t", "--key-bits", "3072", "--neighbors", "30", "--allow-same-ip"]).unwrap();
        assert_eq!((ok.args.key_bits, ok.args.neighbors, ok.args.allow_same_ip), (3072, 30, true));
        let a = TrackerArgs { neighbors: 40, ..TrackerArgs::default() };
        assert!(a.validate().is_err());
    }

    #[test]
    fn help_shows_defaults() {
        let help = Cli::command().render_long_help().to_string();
        for d in [
            "127.0.0.1:7700",
            "./anomos-tracker-data",
            "[default: 2048]",
            "[default: 100000]",
            "[default: 120]",
            "--max-peers + 1024",
            "--max-peers / 10",
            "2 × the longest interval handed out + 30",
            "[default: 1000]",
        ] {
            assert!(help.contains(d), "help lacks {d}: {help}");
        }
    }
}
