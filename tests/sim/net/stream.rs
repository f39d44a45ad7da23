//! The two ends of the simulated network that the code under test holds: a listener, and a connection's
//! stream (one pipe read, the other written; a read waits out the segment's delivery time on the paused clock).

use super::*;

pub(super) struct SimListener {
    pub(super) net: SimNet,
    pub(super) host: HostId,
    pub(super) incarnation: u64,
    pub(super) addr: SocketAddr,
    pub(super) rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Conn>>,
}

impl Drop for SimListener {
    fn drop(&mut self) {
        let mut st = self.net.st();
        // Only our own entry (a restarted host may have bound the same address since).
        if st.listeners.get(&self.addr).is_some_and(|l| l.host == self.host && l.incarnation == self.incarnation) {
            st.listeners.remove(&self.addr);
        }
    }
}

impl Listener for SimListener {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }

    fn accept(&self) -> BoxFuture<'_, io::Result<Conn>> {
        Box::pin(async move {
            match self.rx.lock().await.recv().await {
                Some(c) => Ok(c),
                None => std::future::pending().await,
            }
        })
    }
}

/// One end of a connection.
pub struct SimStream {
    rd: SimRead,
    wr: SimWrite,
}

impl SimStream {
    pub(super) fn new(incoming: PipeRef, outgoing: PipeRef) -> Self {
        SimStream { rd: SimRead { pipe: incoming, sleep: None }, wr: SimWrite { pipe: outgoing } }
    }
}

struct SimRead {
    pipe: PipeRef,
    sleep: Option<Pin<Box<Sleep>>>,
}

struct SimWrite {
    pipe: PipeRef,
}

impl Drop for SimRead {
    fn drop(&mut self) {
        let mut p = lock(&self.pipe);
        p.reader_gone = true;
        p.segs.clear();
        p.wake_all();
    }
}

impl Drop for SimWrite {
    fn drop(&mut self) {
        let mut p = lock(&self.pipe);
        p.write_closed = true;
        p.wake_all();
    }
}

impl AsyncRead for SimRead {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let wait_until = {
                let mut p = lock(&self.pipe);
                if p.reset {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionReset, "connection reset")));
                }
                let now = Instant::now();
                let mut copied = 0;
                while !p.held && buf.remaining() > 0 {
                    let Some((at, seg)) = p.segs.front_mut() else { break };
                    if *at > now {
                        break;
                    }
                    let n = seg.len().min(buf.remaining());
                    buf.put_slice(&seg[..n]);
                    copied += n;
                    if n == seg.len() {
                        p.segs.pop_front();
                    } else {
                        seg.drain(..n);
                    }
                }
                if copied > 0 {
                    p.inflight -= copied;
                    trace(&p.trace, format_args!("recv conn={} {}>{} {copied}", p.id, p.from, p.to));
                    if let Some(w) = p.wr_waker.take() {
                        w.wake();
                    }
                    return Poll::Ready(Ok(()));
                }
                if p.segs.is_empty() && p.write_closed {
                    return Poll::Ready(Ok(())); // EOF
                }
                p.rd_waker = Some(cx.waker().clone());
                match p.segs.front() {
                    Some((at, _)) if !p.held => *at,
                    _ => return Poll::Pending,
                }
            };
            let sleep = match &mut self.sleep {
                Some(s) => {
                    s.as_mut().reset(wait_until);
                    s
                }
                None => self.sleep.insert(Box::pin(tokio::time::sleep_until(wait_until))),
            };
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}

use std::future::Future;

impl AsyncWrite for SimWrite {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let mut p = lock(&self.pipe);
        if p.reset {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionReset, "connection reset")));
        }
        if p.reader_gone || p.write_closed {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "broken pipe")));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if p.inflight >= p.cap {
            p.wr_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = buf.len().min(p.cap - p.inflight);
        let now = Instant::now();
        let max_jitter = p.jitter;
        let jitter = if max_jitter.is_zero() { Duration::ZERO } else { p.rng.gen_range(Duration::ZERO..=max_jitter) };
        let transmit = Duration::from_micros(n as u64 * 1000 / p.bytes_per_ms.max(1));
        let at = (now + p.latency + jitter + transmit).max(p.last_at);
        p.last_at = at;
        p.segs.push_back((at, buf[..n].to_vec()));
        trace(&p.trace, format_args!("send conn={} {}>{} {n} at={:?}", p.id, p.from, p.to, at - now));
        p.inflight += n;
        if let Some(w) = p.rd_waker.take() {
            w.wake();
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut p = lock(&self.pipe);
        p.write_closed = true;
        if let Some(w) = p.rd_waker.take() {
            w.wake();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for SimStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.rd).poll_read(cx, buf)
    }
}

impl AsyncWrite for SimStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.wr).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.wr).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.wr).poll_shutdown(cx)
    }
}

impl Stream for SimStream {
    fn split(self: Box<Self>) -> (ReadHalf, WriteHalf) {
        let SimStream { rd, wr } = *self;
        (Box::new(rd), Box::new(wr))
    }
}
