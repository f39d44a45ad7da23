//! The ordered, end-to-end encrypted message stream of one circuit, as the chain layer sees it (an
//! [`Endpoint`] underneath, or an in-memory pair for tests of the layers above).

use std::sync::Arc;

use anomos_proto::cell::BreakReason;
use anomos_proto::tracker::{FailureKind, FailureReport};
use tokio::sync::mpsc;

use super::endpoint::{Endpoint, StreamEvent};
use super::Reporter;
use crate::error::PeerError;

/// The ordered, end-to-end encrypted message stream of one circuit, as the chain layer sees it.
pub struct CircuitStream {
    endpoint: Option<Arc<Endpoint>>,
    events: mpsc::UnboundedReceiver<StreamEvent>,
    sender: CircuitSender,
    /// Requester side: where to report a misbehaving target.
    reporter: Option<Reporter>,
    /// Onion layers between us and the other end (requester side; 0 at the target).
    pub hops: usize,
}

/// The sending half of a [`CircuitStream`]; cheap to clone.
#[derive(Clone)]
pub struct CircuitSender {
    inner: SenderInner,
}

#[derive(Clone)]
enum SenderInner {
    Circuit(Arc<Endpoint>),
    Memory(mpsc::UnboundedSender<StreamEvent>),
}

impl CircuitSender {
    /// Sends one message.
    pub async fn send(&self, msg: Vec<u8>) -> Result<(), PeerError> {
        match &self.inner {
            SenderInner::Circuit(e) => e.send(&msg).await,
            SenderInner::Memory(tx) => {
                tx.send(StreamEvent::Message(msg)).map_err(|_| PeerError::Broken(BreakReason::Finished))
            }
        }
    }
}

impl CircuitStream {
    pub(crate) fn from_endpoint(
        endpoint: Arc<Endpoint>,
        events: mpsc::UnboundedReceiver<StreamEvent>,
        reporter: Option<Reporter>,
    ) -> Self {
        let hops = endpoint.hops();
        CircuitStream {
            sender: CircuitSender { inner: SenderInner::Circuit(endpoint.clone()) },
            endpoint: Some(endpoint),
            events,
            reporter,
            hops,
        }
    }

    /// The tracker's handle of this circuit (requester side).
    pub fn circuit_ref(&self) -> Option<u64> {
        self.endpoint.as_ref().and_then(|e| e.grant.get().copied())
    }

    /// Breaks the circuit with `reason`. With [`BreakReason::Misbehaving`] on the requester side (the target
    /// sent invalid data), the target is also reported to the tracker, which stops routing to it.
    pub fn abort(mut self, reason: BreakReason) {
        if let Some(e) = self.endpoint.take() {
            e.abort(reason);
            if reason == BreakReason::Misbehaving {
                if let (Some(reporter), Some(circuit)) = (&self.reporter, e.grant.get()) {
                    reporter.report(FailureReport {
                        kind: FailureKind::Misbehaving,
                        neighbor: None,
                        circuit: Some(*circuit),
                        hop_tag: None,
                    });
                }
            }
        }
    }

    /// Two streams joined in memory (for tests of the layers above circuits).
    pub fn memory_pair() -> (CircuitStream, CircuitStream) {
        let (atx, arx) = mpsc::unbounded_channel();
        let (btx, brx) = mpsc::unbounded_channel();
        (
            CircuitStream {
                endpoint: None,
                events: arx,
                sender: CircuitSender { inner: SenderInner::Memory(btx) },
                reporter: None,
                hops: 0,
            },
            CircuitStream {
                endpoint: None,
                events: brx,
                sender: CircuitSender { inner: SenderInner::Memory(atx) },
                reporter: None,
                hops: 0,
            },
        )
    }

    /// A sending handle.
    pub fn sender(&self) -> CircuitSender {
        self.sender.clone()
    }

    /// Sends one message.
    pub async fn send(&self, msg: Vec<u8>) -> Result<(), PeerError> {
        self.sender.send(msg).await
    }

    /// Receives the next message; `Err(Broken(reason))` once the circuit has ended.
    pub async fn recv(&mut self) -> Result<Vec<u8>, PeerError> {
        match self.events.recv().await {
            Some(StreamEvent::Message(m)) => {
                if let Some(e) = &self.endpoint {
                    e.consumed(m.len());
                }
                Ok(m)
            }
            Some(StreamEvent::Closed(r)) => Err(PeerError::Broken(r)),
            None => Err(PeerError::Broken(BreakReason::Finished)),
        }
    }

    /// Closes the circuit gracefully (Close record, then BREAK after our queue drained).
    pub async fn close(mut self) {
        if let Some(e) = self.endpoint.take() {
            e.finish().await;
            e.abort(BreakReason::Finished);
        }
    }
}

impl Drop for CircuitStream {
    fn drop(&mut self) {
        if let Some(e) = self.endpoint.take() {
            e.abort(BreakReason::Finished);
        }
    }
}
