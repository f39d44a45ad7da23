//! The replay cache: the replay tags of the OPENs this hop accepted, each until its layer's expiry (plus the
//! clock-skew tolerance), so a recorded OPEN cannot be played again (SPEC §4.7, §11.7).
//!
//! Hostile neighbors build tracking codes for us themselves (our key is public), so the cache must hold up to
//! a flood of valid, unique tags:
//! * a layer's expiry is bounded ([`anomos_proto::tc::MAX_LAYER_LIFETIME`], checked before a tag gets here), so
//!   no tag stays for ever;
//! * a TC layer is bound to the edge it must arrive over (`prev`), so a replay can only come over that same edge:
//!   tags are kept per edge, and when the cache is tight an edge holding more than its fair part of it is refused
//!   (`replayed`) while every other edge still gets its part — the flooder fills only its own;
//! * expired tags leave in expiry order (an index ordered by expiry), never by scanning the whole cache.
//!
//! It is persisted to `replay-cache.bin` in the data directory (atomically, mode 0600) so a restart does not open
//! a replay window; a damaged or foreign file is ignored with a warning.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use anomos_proto::ids::NeighborId;
use tracing::{info, warn};

/// File name of the persisted replay cache in the data directory.
pub const REPLAY_FILE: &str = "replay-cache.bin";
/// Most replay tags remembered (and persisted: 32 bytes each).
pub const REPLAY_CAP: usize = 1_000_000;
const MAGIC_V1: &[u8; 8] = b"ANRPLY01";
const MAGIC_V2: &[u8; 8] = b"ANRPLY02";
/// The edge that tags loaded from a version-1 file (which did not record edges) are counted under.
const LEGACY_EDGE: NeighborId = NeighborId(0);

/// Why a tag was not recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayRefusal {
    /// Seen before (and not yet expired).
    Seen,
    /// The cache is tight and this edge holds more than its fair part of it.
    EdgeOverShare {
        /// Tags this edge holds.
        held: usize,
        /// Its fair part.
        fair_part: usize,
    },
}

/// Replay tags seen, with their expiry (Unix seconds, clock skew included) and the edge they came over.
pub struct ReplayCache {
    seen: HashMap<[u8; 16], (u64, NeighborId)>,
    by_expiry: BTreeSet<(u64, [u8; 16])>,
    per_edge: HashMap<NeighborId, usize>,
    cap: usize,
    /// Bumped on every insert; compared with `saved` to skip writing an unchanged cache.
    version: u64,
    saved: u64,
}

/// FNV-1a 64, to detect a damaged file (not a security measure: the file is ours, mode 0600).
fn fnv64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b.get(..8).unwrap_or(&[0u8; 8]));
    u64::from_be_bytes(a)
}

impl ReplayCache {
    /// An empty cache of at most `cap` tags.
    pub fn new(cap: usize) -> Self {
        ReplayCache {
            seen: HashMap::new(),
            by_expiry: BTreeSet::new(),
            per_edge: HashMap::new(),
            cap,
            version: 0,
            saved: 0,
        }
    }

    fn insert(&mut self, tag: [u8; 16], horizon: u64, edge: NeighborId) {
        self.seen.insert(tag, (horizon, edge));
        self.by_expiry.insert((horizon, tag));
        *self.per_edge.entry(edge).or_insert(0) += 1;
    }

    /// Forgets every tag that expired before `now` (in expiry order: O(log n) per tag forgotten).
    fn expire(&mut self, now: u64) {
        while let Some(&(exp, tag)) = self.by_expiry.first() {
            if exp >= now {
                break;
            }
            self.by_expiry.pop_first();
            if let Some((_, edge)) = self.seen.remove(&tag) {
                if let Some(n) = self.per_edge.get_mut(&edge) {
                    *n -= 1;
                    if *n == 0 {
                        self.per_edge.remove(&edge);
                    }
                }
            }
        }
    }

    /// The most tags one edge may hold once the cache is more than half full.
    fn fair_part(&self, edge: NeighborId) -> usize {
        let edges = self.per_edge.len() + usize::from(!self.per_edge.contains_key(&edge));
        (self.cap / 2) / edges.max(1)
    }

    /// Records `tag`, which arrived over `edge`, until `horizon`; refused if seen before, or if the cache is tight
    /// and `edge` holds more than its fair part.
    pub fn check(&mut self, tag: [u8; 16], horizon: u64, edge: NeighborId, now: u64) -> Result<(), ReplayRefusal> {
        if let Some(&(exp, _)) = self.seen.get(&tag) {
            if exp >= now {
                return Err(ReplayRefusal::Seen);
            }
        }
        self.expire(now);
        if self.seen.len() >= self.cap / 2 {
            let held = self.per_edge.get(&edge).copied().unwrap_or(0);
            let fair_part = self.fair_part(edge);
            if held >= fair_part || self.seen.len() >= self.cap {
                return Err(ReplayRefusal::EdgeOverShare { held, fair_part });
            }
        }
        self.insert(tag, horizon, edge);
        self.version += 1;
        Ok(())
    }

    /// Number of tags held.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether no tag is held.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Tags held for `edge`.
    pub fn held_by(&self, edge: NeighborId) -> usize {
        self.per_edge.get(&edge).copied().unwrap_or(0)
    }

    /// Whether the cache changed since it was last saved.
    pub fn dirty(&self) -> bool {
        self.version != self.saved
    }

    /// The version an image taken now has (pass it to [`ReplayCache::mark_saved`] once written).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Records that the image of `version` is on disk.
    pub fn mark_saved(&mut self, version: u64) {
        self.saved = self.saved.max(version);
    }

    /// The file image of the unexpired tags: magic `ANRPLY02`, count (u32 BE), count × (tag, expiry u64 BE,
    /// edge u64 BE), FNV-1a 64.
    pub fn encode(&self, now: u64) -> Vec<u8> {
        let live: Vec<_> = self.seen.iter().filter(|(_, &(e, _))| e >= now).collect();
        let mut out = Vec::with_capacity(8 + 4 + live.len() * 32 + 8);
        out.extend_from_slice(MAGIC_V2);
        out.extend_from_slice(&(live.len() as u32).to_be_bytes());
        for (tag, (exp, edge)) in live {
            out.extend_from_slice(tag);
            out.extend_from_slice(&exp.to_be_bytes());
            out.extend_from_slice(&edge.0.to_be_bytes());
        }
        let sum = fnv64(&out);
        out.extend_from_slice(&sum.to_be_bytes());
        out
    }

    /// Parses a file image (version 2, or version 1 from before tags were kept per edge), dropping tags expired
    /// at `now`; an error names what is wrong.
    pub fn decode(data: &[u8], now: u64, cap: usize) -> Result<ReplayCache, String> {
        if data.len() < 20 {
            return Err("not a replay cache file".into());
        }
        let (body, sum) = data.split_at(data.len() - 8);
        let entry = match body.get(..8) {
            Some(m) if m == MAGIC_V2 => 32,
            Some(m) if m == MAGIC_V1 => 24,
            _ => return Err("not a replay cache file".into()),
        };
        if fnv64(body) != be64(sum) {
            return Err("checksum mismatch".into());
        }
        let count =
            body.get(8..12).and_then(|b| <[u8; 4]>::try_from(b).ok()).map(u32::from_be_bytes).unwrap_or(0) as usize;
        let entries = body.get(12..).unwrap_or(&[]);
        if count > cap || entries.len() != count * entry {
            return Err(format!("{count} entries do not fit the file or the limit of {cap}"));
        }
        let mut rc = ReplayCache::new(cap);
        for e in entries.chunks_exact(entry) {
            let (tag_b, rest) = e.split_at(16);
            let exp = be64(rest);
            let edge = if entry == 32 { NeighborId(be64(rest.get(8..).unwrap_or(&[]))) } else { LEGACY_EDGE };
            if exp >= now {
                let mut tag = [0u8; 16];
                tag.copy_from_slice(tag_b);
                rc.insert(tag, exp, edge);
            }
        }
        Ok(rc)
    }

    /// Loads `path`: missing → empty; unreadable or damaged → a warning and empty (never fatal).
    pub fn load(path: &Path, now: u64, cap: usize) -> ReplayCache {
        match std::fs::read(path) {
            Ok(data) => match ReplayCache::decode(&data, now, cap) {
                Ok(rc) => {
                    info!(path = %path.display(), tags = rc.len(), "replay cache loaded");
                    rc
                }
                Err(e) => {
                    warn!(path = %path.display(), "replay cache file ignored ({e}); starting with an empty cache");
                    ReplayCache::new(cap)
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => ReplayCache::new(cap),
            Err(e) => {
                warn!(path = %path.display(), "replay cache not readable ({e}); starting with an empty cache");
                ReplayCache::new(cap)
            }
        }
    }
}

/// Writes `data` to `path` atomically: a temporary file (mode 0600) in the same directory, fsync, rename.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(i: u32) -> [u8; 16] {
        let mut t = [0u8; 16];
        t[..4].copy_from_slice(&i.to_be_bytes());
        t
    }
    const E1: NeighborId = NeighborId(1);
    const E2: NeighborId = NeighborId(2);

    #[test]
    fn replay_cache_round_trips_and_drops_expired_tags() {
        let mut rc = ReplayCache::new(10);
        assert!(rc.check(tag(1), 1_000, E1, 500).is_ok());
        assert!(rc.check(tag(2), 2_000, E2, 500).is_ok());
        assert_eq!(rc.check(tag(1), 1_000, E1, 500), Err(ReplayRefusal::Seen), "a tag is accepted once");
        let image = rc.encode(500);
        let back = ReplayCache::decode(&image, 500, 10).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!((back.held_by(E1), back.held_by(E2)), (1, 1), "edges survive the file");
        let mut back2 = ReplayCache::decode(&image, 1_500, 10).unwrap();
        assert_eq!(back2.len(), 1, "the tag expired at 1000 is dropped at load");
        assert_eq!(back2.check(tag(2), 2_000, E2, 1_500), Err(ReplayRefusal::Seen), "a loaded tag is still refused");
        assert!(back2.check(tag(1), 3_000, E1, 1_500).is_ok(), "an expired tag is forgotten");
    }

    #[test]
    fn one_edge_flooding_unique_tags_fills_only_its_own_part() {
        let mut rc = ReplayCache::new(100);
        // An honest edge holds a few tags.
        for i in 0..5 {
            rc.check(tag(i), 10_000, E1, 0).unwrap();
        }
        // A flooder with long-lived unique tags: it gets the free half, then its part is spent.
        let mut accepted = 0;
        for i in 1000..2000 {
            if rc.check(tag(i), 10_000, E2, 0).is_ok() {
                accepted += 1;
            }
        }
        assert_eq!(accepted, 45, "the flooder took the free half and no more");
        assert!(matches!(rc.check(tag(5000), 10_000, E2, 0), Err(ReplayRefusal::EdgeOverShare { .. })));
        // The honest edge still gets its fair part (50 / 2 edges = 25).
        for i in 5..25 {
            rc.check(tag(i), 10_000, E1, 0).unwrap_or_else(|e| panic!("honest tag {i} refused: {e:?}"));
        }
        assert!(rc.len() <= 100);
        // Once the flood's tags expire, the flooder's edge may record tags again.
        assert!(rc.check(tag(6000), 20_000, E2, 10_001).is_ok());
        assert_eq!(rc.held_by(E2), 1);
    }

    #[test]
    fn version_one_files_load_into_a_legacy_bucket() {
        let mut body = MAGIC_V1.to_vec();
        body.extend_from_slice(&1u32.to_be_bytes());
        body.extend_from_slice(&tag(9));
        body.extend_from_slice(&5_000u64.to_be_bytes());
        let sum = fnv64(&body);
        body.extend_from_slice(&sum.to_be_bytes());
        let mut rc = ReplayCache::decode(&body, 0, 10).unwrap();
        assert_eq!(rc.check(tag(9), 5_000, E1, 0), Err(ReplayRefusal::Seen));
        assert_eq!(rc.held_by(LEGACY_EDGE), 1);
    }

    #[test]
    fn damaged_or_oversized_files_are_refused() {
        let mut rc = ReplayCache::new(10);
        for i in 0..5 {
            rc.check(tag(i), 10_000, E1, 0).unwrap();
        }
        let image = rc.encode(0);
        let mut flipped = image.clone();
        flipped[20] ^= 1;
        assert!(ReplayCache::decode(&flipped, 0, 10).is_err(), "checksum");
        assert!(ReplayCache::decode(&image[..image.len() - 1], 0, 10).is_err(), "truncated");
        assert!(ReplayCache::decode(b"garbage", 0, 10).is_err());
        assert!(ReplayCache::decode(&image, 0, 4).is_err(), "more entries than the limit");
        assert_eq!(ReplayCache::decode(&image, 0, 10).unwrap().len(), 5);
    }

    #[test]
    fn load_survives_missing_and_corrupt_files_and_save_is_atomic_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(REPLAY_FILE);
        assert_eq!(ReplayCache::load(&path, 0, 10).len(), 0, "missing file: empty");
        std::fs::write(&path, b"not a cache at all, just bytes").unwrap();
        assert_eq!(ReplayCache::load(&path, 0, 10).len(), 0, "corrupt file: empty, no panic");
        let mut rc = ReplayCache::new(10);
        rc.check(tag(7), u64::MAX / 2, E1, 0).unwrap();
        write_atomic(&path, &rc.encode(0)).unwrap();
        assert!(!path.with_extension("tmp").exists(), "the temporary file was renamed");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let mut loaded = ReplayCache::load(&path, 0, 10);
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded.check(tag(7), u64::MAX / 2, E1, 0), Err(ReplayRefusal::Seen), "survived the restart");
    }
}
