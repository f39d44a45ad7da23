//! A circuit's two tasks beside the engine: the reader (decodes every message, runs the context-free block checks
//! in parallel with the other circuits' readers) and the writer (sends in order without blocking the engine).

use super::*;

/// Reads one circuit: decodes every message (checking blocks context-free) for the engine,
/// until the circuit ends or the engine says to abort or close it.
pub(super) async fn reader(
    id: usize,
    mut stream: CircuitStream,
    magic: [u8; 4],
    events: mpsc::UnboundedSender<Ev>,
    mut ctl: oneshot::Receiver<Ctl>,
) {
    loop {
        tokio::select! {
            // In order (a simulation replays; an abort goes first).
            biased;
            c = &mut ctl => {
                match c {
                    Ok(Ctl::Abort(r)) => stream.abort(r),
                    Ok(Ctl::Close) => stream.close().await,
                    Err(_) => drop(stream),
                }
                return;
            }
            r = stream.recv() => match r {
                Ok(raw) => {
                    let bytes = raw.len() as u64;
                    let msg = decode_circuit_message(&raw, magic);
                    drop(raw);
                    let checked = match &msg {
                        Ok(Message::Block(b)) => Some(check_block(b)),
                        _ => None,
                    };
                    if events.send(Ev::Msg { id, bytes, msg, checked }).is_err() {
                        return;
                    }
                }
                Err(err) => {
                    let _ = events.send(Ev::Closed { id, err });
                    return;
                }
            }
        }
    }
}

/// Sends one circuit's messages in order.
pub(super) async fn writer(sender: CircuitSender, mut out: mpsc::UnboundedReceiver<Vec<u8>>) {
    while let Some(m) = out.recv().await {
        if sender.send(m).await.is_err() {
            return;
        }
    }
}
