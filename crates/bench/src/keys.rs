//! The key set of a workload: `n` precomputed key strings drawn with a Zipf(`s`) distribution
//! (rank 1 the most frequent), identical for hitcounter and Redis.
//!
//! Drawing a Zipf sample costs a `pow` (it showed up in profiles of the driver, which shares
//! the two cores with the servers), so a pool of `POOL` samples is drawn once, up front, and a
//! batch is a run of consecutive pool entries from a random offset: the hits are still
//! independent Zipf draws, and the driver spends its time sending, for both peers alike.

use rand::Rng;
use rand_distr::{Distribution, Zipf};

/// Zipf samples drawn up front.
const POOL: usize = 1 << 20;

/// Precomputed key names and the distribution over them.
pub(crate) struct Keys {
    names: Vec<String>,
    zipf: Zipf<f64>,
    pool: Vec<u32>,
}

impl Keys {
    /// `n` keys named `/{prefix}/{i}`, drawn with Zipf exponent `s` (0 is uniform).
    pub(crate) fn new(prefix: &str, n: u64, s: f64) -> anyhow::Result<Self> {
        anyhow::ensure!(n > 0, "at least one key");
        let zipf =
            Zipf::new(n as f64, s).map_err(|e| anyhow::anyhow!("Zipf({s}) over {n}: {e}"))?;
        let mut keys = Self {
            names: (0..n).map(|i| format!("/{prefix}/{i}")).collect(),
            zipf,
            pool: Vec::new(),
        };
        let mut rng = rand::rng();
        keys.pool = (0..POOL).map(|_| keys.sample(&mut rng)).collect();
        Ok(keys)
    }

    /// `n` key indices, independent Zipf draws (a run of the pool from a random offset).
    pub(crate) fn sample_batch(&self, rng: &mut impl Rng, n: usize) -> Vec<u32> {
        let start = rng.random_range(0..self.pool.len());
        self.pool[start..]
            .iter()
            .chain(self.pool.iter())
            .cycle()
            .take(n)
            .copied()
            .collect()
    }

    /// A random key index.
    pub(crate) fn sample(&self, rng: &mut impl Rng) -> u32 {
        let rank = self.zipf.sample(rng) as usize;
        (rank.max(1) - 1).min(self.names.len() - 1) as u32
    }

    /// The name of key `i`.
    pub(crate) fn name(&self, i: u32) -> &str {
        &self.names[i as usize]
    }

    /// All names, in index order.
    pub(crate) fn names(&self) -> &[String] {
        &self.names
    }

    /// Number of keys.
    pub(crate) fn len(&self) -> usize {
        self.names.len()
    }
}
