//! The production transport: tokio TCP with `TCP_NODELAY`, and the kernel's smoothed RTT (Linux `TCP_INFO`).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use crate::{BoxFuture, Conn, Listener, ReadHalf, RttProbe, Stream, Transport, WriteHalf};

/// tokio TCP.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tcp;

impl Stream for TcpStream {
    fn split(self: Box<Self>) -> (ReadHalf, WriteHalf) {
        let (r, w) = self.into_split();
        (Box::new(r), Box::new(w))
    }

    fn rtt_probe(&self) -> Option<RttProbe> {
        probe(self)
    }
}

fn conn(s: TcpStream) -> io::Result<Conn> {
    // Every connection of ours carries small request/response messages or cells: never wait for Nagle.
    s.set_nodelay(true)?;
    let (peer, local) = (s.peer_addr()?, s.local_addr()?);
    Ok(Conn { stream: Box::new(s), peer, local })
}

impl Transport for Tcp {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<Conn>> {
        Box::pin(async move { conn(TcpStream::connect(addr).await?) })
    }

    fn bind(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<Box<dyn Listener>>> {
        Box::pin(async move { Ok(Box::new(TcpListener::bind(addr).await?) as Box<dyn Listener>) })
    }
}

impl Listener for TcpListener {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        TcpListener::local_addr(self)
    }

    fn accept(&self) -> BoxFuture<'_, io::Result<Conn>> {
        Box::pin(async move {
            let (s, _) = TcpListener::accept(self).await?;
            // A connection reset between accept and here is that connection's error, like any later one.
            conn(s)
        })
    }
}

/// A probe for a TCP stream: its kernel-smoothed RTT, read while the stream's write half lives.
#[cfg(target_os = "linux")]
fn probe(s: &TcpStream) -> Option<RttProbe> {
    use std::os::fd::AsRawFd;
    let fd = s.as_raw_fd();
    Some(Box::new(move || tcp_srtt(fd)))
}

/// No RTT outside Linux.
#[cfg(not(target_os = "linux"))]
fn probe(_s: &TcpStream) -> Option<RttProbe> {
    None
}

/// `tcpi_rtt` of the socket `fd` (the kernel's smoothed RTT), if the kernel answers.
#[cfg(target_os = "linux")]
pub(crate) fn tcp_srtt(fd: std::os::fd::RawFd) -> Option<Duration> {
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is a zeroed, properly aligned `tcp_info` of `len` bytes that the kernel fills (at most
    // `len`); `fd` is the descriptor of a socket the caller keeps open (the writer task owns its write half).
    // A closed or non-TCP descriptor makes the call fail, which is answered with `None`.
    let r = unsafe {
        libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, info.as_mut_ptr().cast::<libc::c_void>(), &mut len)
    };
    let needed = std::mem::offset_of!(libc::tcp_info, tcpi_rtt) + std::mem::size_of::<u32>();
    if r != 0 || (len as usize) < needed {
        return None;
    }
    // SAFETY: zero-initialised plain integers, then (partly) written by the kernel: every bit pattern is valid.
    let info = unsafe { info.assume_init() };
    (info.tcpi_rtt > 0).then(|| Duration::from_micros(u64::from(info.tcpi_rtt)))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_loopback_connection_has_a_small_rtt_and_a_closed_one_none() {
        let l = Tcp.bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let c = Tcp.connect(l.local_addr().unwrap()).await.unwrap();
        let s = l.accept().await.unwrap();
        assert_eq!(s.peer, c.local);
        let mut p = c.stream.rtt_probe().unwrap();
        let rtt = p().expect("an RTT for a connected socket");
        assert!(rtt < Duration::from_millis(50), "{rtt:?}");
        drop((s, l));
        assert!(tcp_srtt(-1).is_none());
    }
}
