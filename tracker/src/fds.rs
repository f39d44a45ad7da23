//! The open-file limit: a descriptor per open connection (`--max-connections`; sessions resume on new
//! connections, SPEC §3.4, so peers hold none between announces) and per running probe. The soft limit is raised at start to what the configuration
//! needs (and the hard limit with it, where the process may: CAP_SYS_RESOURCE). If the OS refuses:
//!
//! * with `--max-connections` given, the tracker does not start (clear error): the operator asked for it;
//! * with the default (derived from `--max-peers`), the soft limit goes up to the hard one and the connection limit
//!   is cut to what fits, with an INFO line saying what to raise (a WARN per connection dropped once the cap is
//!   reached). A tracker started with default flags on a host
//!   with a low hard limit thus still runs, sized to the host.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

use crate::config::TrackerArgs;
use crate::error::TrackerError;

/// Descriptors kept aside for the listeners, the state database, the metrics endpoint and logging.
const MARGIN: u64 = 256;

/// The connection limit the tracker runs with, after raising the open-file limit as far as it may.
pub(crate) fn connections_for(args: &TrackerArgs) -> Result<usize, TrackerError> {
    let needed = args.files_needed();
    let refused = match raise_to(needed) {
        Ok(_) => return Ok(args.connections_limit()),
        Err(e) if args.max_connections.is_some() => return Err(e),
        Err(e) => e,
    };
    let hard = getrlimit(Resource::Nofile).maximum;
    let got = match hard {
        Some(h) => raise_to(h).ok().and_then(|f| f.now).unwrap_or(h),
        None => needed,
    };
    let conns = usize::try_from(got.saturating_sub(args.probes_limit() as u64 + MARGIN)).unwrap_or(usize::MAX);
    let conns = conns.clamp(16, args.connections_limit());
    // INFO, not WARN: nothing the operator asked for is refused (only the default was cut to the host), and a tracker
    // that reaches the cap says so at WARN for every connection it drops ("too many connections").
    tracing::info!(
        open_files = got, connections = conns, wanted = args.connections_limit(), max_peers = args.max_peers,
        reason = %refused,
        "the open-file limit caps the connections open at once: more are refused until others close; raise \
         the hard limit (ulimit -Hn, LimitNOFILE) to the wanted connections + 800"
    );
    Ok(conns)
}

/// What was done about the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Files {
    /// The soft limit before.
    pub(crate) was: Option<u64>,
    /// The soft limit now (`None`: unlimited).
    pub(crate) now: Option<u64>,
}

/// Makes the soft `RLIMIT_NOFILE` at least `needed`, raising the hard limit too when it is lower (which needs
/// privilege). Never lowers a limit.
pub(crate) fn raise_to(needed: u64) -> Result<Files, TrackerError> {
    let cur = getrlimit(Resource::Nofile);
    let enough = |v: Option<u64>| v.is_none_or(|v| v >= needed);
    if enough(cur.current) {
        return Ok(Files { was: cur.current, now: cur.current });
    }
    let maximum = if enough(cur.maximum) { cur.maximum } else { Some(needed) };
    setrlimit(Resource::Nofile, Rlimit { current: Some(needed), maximum }).map_err(|e| {
        let hard = cur.maximum.map_or("unlimited".to_string(), |h| h.to_string());
        TrackerError::Files(format!(
            "this configuration needs {needed} open files (a connection each: --max-peers / --max-connections), but \
             the limit is {} (hard {hard}) and raising it failed ({e}): raise it (`ulimit -n {needed}`, systemd \
             LimitNOFILE={needed}) or lower --max-peers",
            cur.current.unwrap_or(0)
        ))
    })?;
    Ok(Files { was: cur.current, now: Some(needed) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_already_high_enough_is_left_alone_and_never_lowered() {
        let before = getrlimit(Resource::Nofile);
        let f = raise_to(16).unwrap();
        assert_eq!((f.was, f.now), (before.current, before.current));
        assert_eq!(getrlimit(Resource::Nofile).current, before.current);
    }

    #[test]
    fn default_sessions_fit_the_limit_and_explicit_ones_must() {
        // Needs at most the current hard limit: always possible.
        let hard = getrlimit(Resource::Nofile).maximum.unwrap_or(1 << 20).min(1 << 20);
        let small = TrackerArgs { max_peers: 100, ..TrackerArgs::default() };
        assert_eq!(connections_for(&small).unwrap(), 1034);
        // Far above any hard limit: the default is cut to what fits, an explicit limit is an error.
        let huge = TrackerArgs { max_peers: 1 << 44, ..TrackerArgs::default() };
        let s = connections_for(&huge).unwrap();
        assert!(s >= 16 && (s as u64) <= hard, "{s}");
        let explicit = TrackerArgs { max_connections: Some(1 << 40), ..TrackerArgs::default() };
        assert!(connections_for(&explicit).unwrap_err().to_string().contains("open files"));
    }

    #[test]
    fn an_impossible_limit_is_a_clear_error() {
        // Above the kernel's nr_open: refused even for root.
        let e = raise_to(u64::from(u32::MAX) * 4).unwrap_err().to_string();
        assert!(e.contains("open files") && e.contains("--max-peers"), "{e}");
    }
}
