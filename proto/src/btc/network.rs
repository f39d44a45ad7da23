//! Which Bitcoin(-like) network we speak: magic bytes, genesis, port and proof-of-work rules.
//!
//! The five Bitcoin networks come from `bitcoin::params::Params` and
//! `bitcoin::constants::genesis_block`; [`NetParams::custom`] describes any other chain that
//! uses Bitcoin's wire format (a private regtest, a Bitcoin-derived coin), about whose
//! proof of work nothing is known.

use bitcoin::params::Params;
use bitcoin::{Block, BlockHash, Network, Target};

/// The difficulty rules of a network: which nBits a header must carry, given its ancestors
/// (Bitcoin Core's `GetNextWorkRequired`, see
/// [`next_work_required`](super::validate::next_work_required)).
///
/// "Period": the 2016 blocks from a height divisible by 2016. "Retarget": at the first block of
/// a period, nBits becomes `old × clamp(actual, 2 weeks / 4, 2 weeks × 4) / 2 weeks`, capped at
/// the PoW limit, where `actual` is the time from the previous period's first block to its last.
/// "Min-difficulty blocks": a block (other than a period's first) whose time is more than 20
/// minutes after its parent's must carry the PoW limit; otherwise it carries the nBits of the
/// last block of its period (walking back from its parent, at most to the period's first block)
/// that is not at the PoW limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DifficultyRules {
    /// No rule beyond the PoW limit: custom chains, whose rules we do not know.
    Unchecked,
    /// Regtest: min-difficulty blocks and no retargeting (a period's first block carries its
    /// parent's nBits).
    NoRetarget,
    /// Mainnet and signet: nBits is the parent's, and retargets from the last block's nBits.
    Retarget,
    /// Testnet3: min-difficulty blocks, retargeting from the last block's nBits (which may be a
    /// min-difficulty block: the "block storm" bug BIP 94 fixes).
    Testnet3,
    /// Testnet4 (BIP 94): min-difficulty blocks, retargeting from the nBits of the previous
    /// period's *first* block, and the timewarp rule: a period's first block may not be more
    /// than 600 s earlier than its parent.
    Testnet4,
}

impl DifficultyRules {
    /// Whether nBits changes every 2016 blocks (Core's `!fPowNoRetargeting`).
    pub fn retargets(self) -> bool {
        matches!(self, Self::Retarget | Self::Testnet3 | Self::Testnet4)
    }

    /// Whether blocks more than 20 minutes after their parent carry the PoW limit (Core's
    /// `fPowAllowMinDifficultyBlocks`).
    pub fn min_difficulty_blocks(self) -> bool {
        matches!(self, Self::NoRetarget | Self::Testnet3 | Self::Testnet4)
    }

    /// Whether BIP 94 applies: retarget from the period's first block, timewarp rule (Core's
    /// `enforce_BIP94`).
    pub fn bip94(self) -> bool {
        self == Self::Testnet4
    }
}

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
    /// Which nBits a header must carry given its ancestors (see [`DifficultyRules`] and
    /// [`check_difficulty`](super::validate::check_difficulty)).
    pub difficulty: DifficultyRules,
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
            difficulty: match network {
                Network::Bitcoin | Network::Signet => DifficultyRules::Retarget,
                Network::Testnet => DifficultyRules::Testnet3,
                Network::Testnet4 => DifficultyRules::Testnet4,
                Network::Regtest => DifficultyRules::NoRetarget,
            },
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
    /// target there is (2^256 - 1: any nBits that decodes is accepted), `difficulty` is
    /// [`DifficultyRules::Unchecked`] and `network` is `None`; `no_pow_check` is false
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
            difficulty: DifficultyRules::Unchecked,
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
    fn difficulty_rules() {
        use DifficultyRules::*;
        assert_eq!(NetParams::mainnet().difficulty, Retarget);
        assert_eq!(NetParams::signet().difficulty, Retarget);
        assert_eq!(NetParams::testnet3().difficulty, Testnet3);
        assert_eq!(NetParams::testnet4().difficulty, Testnet4);
        assert_eq!(NetParams::regtest().difficulty, NoRetarget);
        // The same flags as the bitcoin crate's copy of Core's chainparams.
        for n in [Network::Bitcoin, Network::Testnet, Network::Testnet4, Network::Signet, Network::Regtest] {
            let (d, p) = (NetParams::from_network(n).difficulty, Params::new(n));
            assert_eq!(d.retargets(), !p.no_pow_retargeting, "{n}");
            assert_eq!(d.min_difficulty_blocks(), p.allow_min_difficulty_blocks, "{n}");
            assert_eq!(d.bip94(), n == Network::Testnet4, "{n}");
        }
        let c = NetParams::custom("x", [1, 2, 3, 4], BlockHash::all_zeros(), 1);
        assert!(c.difficulty == Unchecked && c.network.is_none() && c.genesis_block().is_none());
        assert!(!Unchecked.retargets() && !Unchecked.min_difficulty_blocks());
        assert!(c.pow_limit > NetParams::regtest().pow_limit);
    }
}
