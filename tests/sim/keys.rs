//! A fixed pool of RSA-2048 identities for simulated hosts: generated once from fixed seeds (RSA key generation
//! takes ~0.1–1 s a key), cached under the test target's temporary directory, loaded once per test process.

use std::path::PathBuf;
use std::sync::OnceLock;

use anomos_proto::identity::Identity;
use rand::rngs::StdRng;
use rand::SeedableRng;

/// Keys in the pool (hosts of one run at most).
pub const POOL: usize = 48;

fn cache_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sim-keys")
}

fn make(i: usize) -> Identity {
    let path = cache_dir().join(format!("key-{i}.pem"));
    if let Ok(pem) = std::fs::read_to_string(&path) {
        if let Ok(id) = Identity::from_pkcs8_pem(&pem) {
            return id;
        }
    }
    let mut rng = StdRng::seed_from_u64(0x5349_4d00 + i as u64);
    let id = Identity::generate(&mut rng, 2048).unwrap();
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, id.to_pkcs8_pem().unwrap()).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    id
}

/// The pool (generated or loaded on first use, on as many threads as there are cores).
pub fn pool() -> &'static [Identity] {
    static POOL_KEYS: OnceLock<Vec<Identity>> = OnceLock::new();
    POOL_KEYS.get_or_init(|| {
        std::fs::create_dir_all(cache_dir()).unwrap();
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).max(1);
        let mut out: Vec<Option<Identity>> = (0..POOL).map(|_| None).collect();
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| s.spawn(move || (t..POOL).step_by(threads).map(|i| (i, make(i))).collect::<Vec<_>>()))
                .collect();
            for h in handles {
                for (i, id) in h.join().unwrap() {
                    out[i] = Some(id);
                }
            }
        });
        out.into_iter().map(Option::unwrap).collect()
    })
}
