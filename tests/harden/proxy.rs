//! A loopback TCP proxy that records every byte it forwards (a link or tracker observer).

use super::*;

// ---------------------------------------------------------------------------------------------------------
// A recording TCP proxy
// ---------------------------------------------------------------------------------------------------------

/// One recorded byte stream (a connection in one direction).
type Recording = Arc<Mutex<Vec<u8>>>;

/// Forwards connections from `addr` to a target and records every byte, per connection and direction.
pub struct Proxy {
    pub addr: SocketAddr,
    streams: Arc<Mutex<Vec<Recording>>>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    /// A proxy on a free loopback port toward `target`.
    pub fn start(target: SocketAddr) -> Proxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let streams: Arc<Mutex<Vec<Recording>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (st, stp) = (streams.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stp.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(a) = conn else { continue };
                let Ok(b) = std::net::TcpStream::connect(target) else { continue };
                let _ = a.set_nodelay(true);
                let _ = b.set_nodelay(true);
                for (mut from, mut to) in [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)] {
                    let rec = Arc::new(Mutex::new(Vec::new()));
                    st.lock().unwrap().push(rec.clone());
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        loop {
                            match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    rec.lock().unwrap().extend_from_slice(&buf[..n]);
                                    if to.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        Proxy { addr, streams, stop }
    }

    /// Everything recorded so far, one byte string per connection and direction.
    pub fn recorded(&self) -> Vec<Vec<u8>> {
        self.streams.lock().unwrap().iter().map(|s| s.lock().unwrap().clone()).collect()
    }

    /// Total bytes recorded.
    pub fn total(&self) -> usize {
        self.recorded().iter().map(Vec::len).sum()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = std::net::TcpStream::connect(self.addr);
    }
}

/// A free loopback port (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Whether `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}
