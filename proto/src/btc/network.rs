//! Which Bitcoin(-like) network we speak: magic bytes, genesis, port and proof-of-work rules.
//!
//! The five Bitcoin networks come from `bitcoin::params::Params` and
//! `bitcoin::constants::genesis_block`; [`NetParams::custom`] describes any other chain that
//! uses Bitcoin's wire format (a private regtest, a Bitcoin-derived coin), about whose
//! proof of work nothing is known.

use bitcoin::params::Params;
use bitcoin::{Block, BlockHash, Network, Target};

/// Parameters of one network, as far as the wire and header-validation layers need them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetParams {
    /// Human-readable name (`"mainnet"`, `"testnet3"`, ... or the custom name).
    pub name: String,
    /// The 4 magic bytes that start every envelope on this network.
    pub magic: [u8; 4],
    /// Hash of block 0.
    pub genesis_hash: BlockHash,
    /// The default P2P TCP port.
    pub default_port: u16,
    /// The `bitcoin` crate's network, `None` for custom chains.
    pub network: Option<Network>,
    /// The easiest target a header may claim (Bitcoin Core's `powLimit`, attainable form).
    pub pow_limit: Target,
    /// Whether difficulty retargets every 2016 blocks (false for regtest and custom chains).
    pub retarget: bool,
    /// Whether a block more than 20 minutes after its parent may use the minimum difficulty
    /// (testnet3/testnet4, and regtest as in Bitcoin Core; irrelevant when `retarget` is false).
    pub allow_min_difficulty: bool,
    /// Skip the "block hash meets the target" test in
    /// [`check_header_pow`](super::validate::check_header_pow).
    ///
    /// Only for chains whose proof-of-work hash is not the SHA-256d block hash (Litecoin's
    /// scrypt, for example): there the SHA-256d hash says nothing about the work done. nBits
    /// is still decoded and bounded by `pow_limit`. False for every Bitcoin network and,
    /// by default, for custom ones.
    pub no_pow_check: bool,
}

impl NetParams {
    /// Bitcoin mainnet.
    pub fn mainnet() -> NetParams {
        Self::known(Network::Bitcoin, "mainnet")
    }

    /// Bitcoin testnet3.
    pub fn testnet3() -> NetParams {
        Self::known(Network::Testnet, "testnet3")
    }

    /// Bitcoin testnet4 (BIP 94).
    pub fn testnet4() -> NetParams {
        Self::known(Network::Testnet4, "testnet4")
    }

    /// The default Bitcoin signet.
    pub fn signet() -> NetParams {
        Self::known(Network::Signet, "signet")
    }

    /// Bitcoin regtest.
    pub fn regtest() -> NetParams {
        Self::known(Network::Regtest, "regtest")
    }

    /// Parameters of a `bitcoin` crate network.
    pub fn from_network(network: Network) -> NetParams {
        match network {
            Network::Bitcoin => Self::mainnet(),
            Network::Testnet => Self::testnet3(),
            Network::Testnet4 => Self::testnet4(),
            Network::Signet => Self::signet(),
            Network::Regtest => Self::regtest(),
        }
    }

    fn known(network: Network, name: &str) -> NetParams {
        let params = Params::new(network);
        let genesis = bitcoin::constants::genesis_block(&params);
        NetParams {
            name: name.to_owned(),
            magic: network.magic().to_bytes(),
            genesis_hash: genesis.block_hash(),
            default_port: default_port(network),
            network: Some(network),
            pow_limit: params.max_attainable_target,
            retarget: !params.no_pow_retargeting,
            allow_min_difficulty: params.allow_min_difficulty_blocks,
            no_pow_check: false,
        }
    }

    /// Looks a network up by name: `"mainnet"`/`"bitcoin"`/`"main"`, `"testnet"`/`"testnet3"`,
    /// `"testnet4"`, `"signet"`, `"regtest"` (ASCII case-insensitive).
    pub fn by_name(name: &str) -> Option<NetParams> {
        let network = match name.to_ascii_lowercase().as_str() {
            "mainnet" | "bitcoin" | "main" => Network::Bitcoin,
            "testnet" | "testnet3" => Network::Testnet,
            "testnet4" => Network::Testnet4,
            "signet" => Network::Signet,
            "regtest" => Network::Regtest,
            _ => return None,
        };
        Some(Self::from_network(network))
    }

    /// Looks a known network up by its magic bytes.
    pub fn by_magic(magic: [u8; 4]) -> Option<NetParams> {
        Network::from_magic(bitcoin::p2p::Magic::from_bytes(magic)).map(Self::from_network)
    }

    /// A private or Bitcoin-derived chain that speaks Bitcoin's wire format.
    ///
    /// Nothing is known about its proof-of-work limit, so `pow_limit` is the most permissive
    /// target there is (2^256 - 1: any nBits that decodes is accepted), `retarget` and
    /// `allow_min_difficulty` are false and `network` is `None`; `no_pow_check` is false
    /// (the SHA-256d hash must still meet nBits). Set the public fields for anything better
    /// known, e.g. `no_pow_check = true` for a chain with a different PoW hash function.
    pub fn custom(name: impl Into<String>, magic: [u8; 4], genesis_hash: BlockHash, port: u16) -> NetParams {
        NetParams {
            name: name.into(),
            magic,
            genesis_hash,
            default_port: port,
            network: None,
            pow_limit: Target::from_be_bytes([0xff; 32]),
            retarget: false,
            allow_min_difficulty: false,
            no_pow_check: false,
        }
    }

    /// The genesis block of a known network; `None` for custom chains.
    pub fn genesis_block(&self) -> Option<Block> {
        self.network.map(|n| bitcoin::constants::genesis_block(Params::new(n)))
    }

    /// The `bitcoin` crate's consensus parameters, for known networks.
    pub fn consensus_params(&self) -> Option<Params> {
        self.network.map(Params::new)
    }

    /// True if `hash` is this network's genesis hash.
    pub fn is_genesis(&self, hash: &BlockHash) -> bool {
        *hash == self.genesis_hash
    }
}

/// Default P2P port of a `bitcoin` crate network (Bitcoin Core's chainparams).
fn default_port(network: Network) -> u16 {
    match network {
        Network::Bitcoin => 8333,
        Network::Testnet => 18333,
        Network::Testnet4 => 48333,
        Network::Signet => 38333,
        Network::Regtest => 18444,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitcoin::hashes::Hash;

    #[test]
    fn names_and_aliases() {
        for (alias, name) in [
            ("mainnet", "mainnet"),
            ("bitcoin", "mainnet"),
            ("testnet", "testnet3"),
            ("testnet3", "testnet3"),
            ("testnet4", "testnet4"),
            ("signet", "signet"),
            ("regtest", "regtest"),
            ("RegTest", "regtest"),
        ] {
            assert_eq!(NetParams::by_name(alias).map(|p| p.name), Some(name.to_owned()));
        }
        assert!(NetParams::by_name("litecoin").is_none());
    }

    #[test]
    fn magic_round_trip() {
        for p in [
            NetParams::mainnet(),
            NetParams::testnet3(),
            NetParams::testnet4(),
            NetParams::signet(),
            NetParams::regtest(),
        ] {
            assert_eq!(NetParams::by_magic(p.magic), Some(p.clone()));
            let g = p.genesis_block();
            assert_eq!(g.map(|b| b.block_hash()), Some(p.genesis_hash));
        }
        assert!(NetParams::by_magic([0, 0, 0, 0]).is_none());
    }

    #[test]
    fn retarget_flags() {
        assert!(NetParams::mainnet().retarget);
        assert!(!NetParams::mainnet().allow_min_difficulty);
        assert!(NetParams::testnet3().allow_min_difficulty);
        assert!(NetParams::testnet4().allow_min_difficulty);
        assert!(!NetParams::regtest().retarget);
        let c = NetParams::custom("x", [1, 2, 3, 4], BlockHash::all_zeros(), 1);
        assert!(!c.retarget && c.network.is_none() && c.genesis_block().is_none());
        assert!(c.pow_limit > NetParams::regtest().pow_limit);
    }
}
