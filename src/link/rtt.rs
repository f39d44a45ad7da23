//! The smoothed round-trip time of a link's TCP connection, as the kernel measures it (Linux `TCP_INFO`), for
//! receive-window auto-tuning (`circuit/window.rs`). Elsewhere, and on in-memory links, it is unknown and windows
//! keep their announced size.

use std::time::Duration;

/// Reads a link's RTT; called by the link's writer task, which owns the socket (so the descriptor is valid).
pub type RttProbe = Box<dyn FnMut() -> Option<Duration> + Send>;

/// A probe for a TCP stream: its kernel-smoothed RTT, read while the stream's write half lives.
#[cfg(target_os = "linux")]
pub fn probe(s: &tokio::net::TcpStream) -> Option<RttProbe> {
    use std::os::fd::AsRawFd;
    let fd = s.as_raw_fd();
    Some(Box::new(move || tcp_srtt(fd)))
}

/// No RTT outside Linux.
#[cfg(not(target_os = "linux"))]
pub fn probe(_s: &tokio::net::TcpStream) -> Option<RttProbe> {
    None
}

/// `tcpi_rtt` of the socket `fd` (the kernel's smoothed RTT), if the kernel answers.
#[cfg(target_os = "linux")]
fn tcp_srtt(fd: std::os::fd::RawFd) -> Option<Duration> {
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
    #[tokio::test]
    async fn a_loopback_connection_has_a_small_rtt_and_a_closed_one_none() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = tokio::net::TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        let mut p = super::probe(&c).unwrap();
        let rtt = p().expect("an RTT for a connected socket");
        assert!(rtt < std::time::Duration::from_millis(50), "{rtt:?}");
        drop((s, l));
        assert!(super::tcp_srtt(-1).is_none());
    }
}
