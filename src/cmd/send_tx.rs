//! `anomos send-tx HEX`: broadcast a transaction anonymously.
//!
//! The transaction's syntax and structure are checked here first (it must decode completely and
//! pass the pool rules: inputs and outputs, no input twice, ≤ 100 kvB, not a coinbase). Then
//! this process joins the overlay as a peer, opens one fresh circuit through `--relays` relays
//! to a peer serving the chain, shakes hands with the anonymous `version` (no address, no
//! services, `relay = false`), sends `tx`, and asks for it back (`ping`, then `getdata`) to
//! learn whether the serving peer took it into its pool; a `reject` says why not. The serving
//! peer announces it with `inv` on its other circuits. It never learns our address: the
//! circuit's target sees only its previous hop.

use std::time::{Duration, Instant};

use anomos_proto::btc::{Inventory, Message};
use anomos_proto::ids::ChainId;
use anomos_proto::tracker::CircuitRequest;
use bitcoin::hashes::Hash;
use bitcoin::Transaction;
use clap::Args;
use tracing::info;

use super::chain::NetArgs;
use super::{launch, NodeArgs};
use crate::chain::sync::handshake;
use crate::chain::validate::check_pool_tx;
use crate::chain::wire::BtcPeer;
use crate::error::PeerError;

/// Flags of `anomos send-tx`.
#[derive(Args, Debug, Clone)]
pub struct SendTxArgs {
    /// The transaction, hex-encoded (consensus serialization, with witness data if any).
    #[arg(value_name = "HEX")]
    pub tx: String,
    #[command(flatten)]
    pub node: NodeArgs,
    /// Chain whose serving peers get the transaction.
    #[arg(long, default_value = "regtest")]
    pub chain: String,
    #[command(flatten)]
    pub net: NetArgs,
    /// Relays on the circuit (hops = relays + 1).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=6))]
    pub relays: u8,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
}

/// Decodes and checks a hex transaction.
pub fn parse_tx(hex_tx: &str) -> Result<Transaction, PeerError> {
    let raw = hex::decode(hex_tx.trim()).map_err(|e| PeerError::Config(format!("transaction hex: {e}")))?;
    let tx: Transaction = bitcoin::consensus::deserialize(&raw)
        .map_err(|e| PeerError::Config(format!("not a transaction (or bytes left over): {e}")))?;
    check_pool_tx(&tx).map_err(|e| PeerError::Config(format!("transaction refused before sending: {e}")))?;
    Ok(tx)
}

/// Runs `anomos send-tx`.
pub async fn run(args: &SendTxArgs) -> Result<(), PeerError> {
    let tx = parse_tx(&args.tx)?;
    let txid = tx.compute_txid();
    let params = args.net.params(&args.chain)?;
    let chain = ChainId::new(&params.name).map_err(|e| PeerError::Config(e.to_string()))?;
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let node = launch(args.node.config(), None).await?;
    let stream = loop {
        if Instant::now() > deadline {
            return Err(PeerError::Timeout("a circuit to a serving peer"));
        }
        if node.link_count() == 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let req = CircuitRequest { chain: chain.clone(), count: 1, relays: args.relays };
        match node.request_circuits(req).await {
            Ok(mut s) if !s.is_empty() => break s.swap_remove(0),
            Ok(_) => info!("no circuit yet; retrying"),
            Err(e) => info!("circuit request failed ({e}); retrying"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let hops = stream.hops;
    let mut peer = BtcPeer::new(stream, params.magic);
    let left = deadline.saturating_duration_since(Instant::now());
    handshake(&mut peer, 0, false, left).await?;
    peer.send(&Message::Tx(tx)).await?;
    let nonce: u64 = rand::random();
    peer.send(&Message::Ping(nonce)).await?;
    peer.send(&Message::GetData(vec![Inventory::WitnessTransaction(txid)])).await?;
    let mut rejected = None;
    let accepted = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match peer.recv_timeout(left, "the serving peer's answer").await? {
            Message::Reject(r) if r.hash == Some(txid.to_raw_hash().to_byte_array()) => {
                rejected = Some((r.ccode, r.reason))
            }
            Message::Tx(t) if t.compute_txid() == txid => break true,
            Message::NotFound(items) if items.contains(&Inventory::WitnessTransaction(txid)) => break false,
            Message::Ping(n) => peer.send(&Message::Pong(n)).await?,
            _ => {}
        }
    };
    peer.into_stream().close().await;
    match (accepted, rejected) {
        (true, None) => println!("sent txid={txid} accepted=true hops={hops}"),
        (true, Some((_, why))) => println!("sent txid={txid} accepted=true hops={hops} note=\"{why}\""),
        (false, Some((code, why))) => {
            println!("sent txid={txid} accepted=false hops={hops} code={code:#04x} reason=\"{why}\"");
            return Err(PeerError::Chain(format!("the serving peer refused {txid}: {why}")));
        }
        (false, None) => {
            println!("sent txid={txid} accepted=false hops={hops}");
            return Err(PeerError::Chain(format!("the serving peer did not keep {txid}")));
        }
    }
    Ok(())
}
