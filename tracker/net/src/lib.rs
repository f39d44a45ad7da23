//! # anomos-net — the runtime seams
//!
//! Everything the peer and the tracker need from the outside world that a deterministic simulation
//! (`tests/simulation.rs`) must be able to replace, and nothing else:
//!
//! * [`Transport`]: connect, and listen + accept. A connection is a [`Conn`]: a boxed byte stream (split into
//!   owned halves without a lock), its peer and local address, and an optional RTT probe (`TCP_INFO` on Linux
//!   TCP). Production uses [`Tcp`] — tokio's TCP, exactly as before (`TCP_NODELAY` on every connection); the
//!   only cost is one boxed stream per connection and a virtual call per read or write.
//! * [`rt`]: the runtime calls whose timing a simulation must own: blocking work ([`rt::spawn_blocking`]), the
//!   wall clock ([`rt::unix_now`]) and the seed of the tracker's graph RNG ([`rt::seed_rng`]). Outside a
//!   simulation they are tokio's blocking pool, `SystemTime`, and the OS's randomness.
//!
//! * [`Clock`]: a host's wall clock as its node or tracker reads it (for TC expiries and the replay cache):
//!   [`rt::unix_now`] in production; a simulation skews each host's (within the protocol's tolerance). A
//!   [`Transport`] says which clock its host has ([`Transport::clock`]).
//!
//! Handles are passed down narrowly: a layer gets the `Arc<dyn Transport>` it dials or listens with, never the
//! node or tracker that owns it.

#![forbid(unsafe_op_in_unsafe_fn)]

pub mod rt;
mod tcp;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

pub use tcp::Tcp;

/// A boxed future (what the object-safe traits return).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Reads a connection's round-trip time (the kernel's smoothed RTT for TCP on Linux); called by the link's writer
/// task, which owns the write half (so the socket is open while it is called).
pub type RttProbe = Box<dyn FnMut() -> Option<Duration> + Send>;

/// The read half of a connection.
pub type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
/// The write half of a connection.
pub type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

/// A connected byte stream.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {
    /// Splits into owned halves (for TCP, tokio's `into_split`: no lock between them).
    fn split(self: Box<Self>) -> (ReadHalf, WriteHalf);
    /// A probe of the connection's RTT, if the transport measures one.
    fn rtt_probe(&self) -> Option<RttProbe> {
        None
    }
}

/// An established connection.
pub struct Conn {
    /// The byte stream.
    pub stream: Box<dyn Stream>,
    /// The other end's address.
    pub peer: SocketAddr,
    /// Our end's address.
    pub local: SocketAddr,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("peer", &self.peer).field("local", &self.local).finish()
    }
}

/// A bound listening socket.
pub trait Listener: Send + Sync + 'static {
    /// The bound address (the real port when bound to port 0).
    fn local_addr(&self) -> io::Result<SocketAddr>;
    /// The next incoming connection.
    fn accept(&self) -> BoxFuture<'_, io::Result<Conn>>;
}

/// How a node or tracker reaches the network.
pub trait Transport: Send + Sync + 'static {
    /// Opens a connection to `addr` (no timeout of its own: callers bound it).
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<Conn>>;
    /// Binds a listening socket at `addr` (port 0: any free port).
    fn bind(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<Box<dyn Listener>>>;
    /// The wall clock of the host this transport belongs to (production: the machine's).
    fn clock(&self) -> Clock {
        Clock::default()
    }
}

/// A host's wall clock: [`rt::unix_now`] moved by a fixed skew (zero in production; a simulation gives each host
/// its own, within the clock-skew tolerance the protocol allows, SPEC §4.7).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Clock {
    skew_secs: i64,
}

impl Clock {
    /// A clock `skew_secs` ahead of (negative: behind) the true one.
    pub fn skewed(skew_secs: i64) -> Clock {
        Clock { skew_secs }
    }

    /// Seconds since the Unix epoch on this clock.
    pub fn unix_now(&self) -> u64 {
        rt::unix_now().saturating_add_signed(self.skew_secs)
    }

    /// The skew, in seconds.
    pub fn skew_secs(&self) -> i64 {
        self.skew_secs
    }
}

/// The transport handle layers hold.
pub type Net = Arc<dyn Transport>;

/// The production transport (tokio TCP).
pub fn tcp() -> Net {
    Arc::new(Tcp)
}
