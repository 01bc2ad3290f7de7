//! The key set of a workload: `n` precomputed key strings drawn with a Zipf(`s`) distribution
//! (rank 1 the most frequent), identical for hitcounter and Redis.

use rand::Rng;
use rand_distr::{Distribution, Zipf};

/// Precomputed key names and the distribution over them.
pub(crate) struct Keys {
    names: Vec<String>,
    zipf: Zipf<f64>,
}

impl Keys {
    /// `n` keys named `/{prefix}/{i}`, drawn with Zipf exponent `s` (0 is uniform).
    pub(crate) fn new(prefix: &str, n: u64, s: f64) -> anyhow::Result<Self> {
        anyhow::ensure!(n > 0, "at least one key");
        let zipf =
            Zipf::new(n as f64, s).map_err(|e| anyhow::anyhow!("Zipf({s}) over {n}: {e}"))?;
        Ok(Self {
            names: (0..n).map(|i| format!("/{prefix}/{i}")).collect(),
            zipf,
        })
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
