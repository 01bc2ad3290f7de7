//! The longest single `add` while a store grows to `N` keys (default 1,000,000).
//!
//! Growing a key table moves every key's slot to a table twice the size, and
//! the store's readers wait meanwhile. The keys are split over
//! `SUB_TABLES` tables, so one growth moves a sixteenth of them (measured:
//! longest add 0.17 ms at 100k keys and 4.6 ms at 1M, where one table took
//! 2.0 ms and 39–81 ms). This prints the worst add and the key count it
//! happened at, which is where a table grew.
//!
//! ```text
//! cargo run --release -p hitcounter-window --example growth -- 1000000
//! ```

use hitcounter_window::{StoreError, WindowStore};

fn main() -> Result<(), StoreError> {
    let keys: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let mut store = WindowStore::default();
    let (mut worst, mut worst_at) = (std::time::Duration::ZERO, 0);
    for i in 0..keys {
        let key = format!("background/key-{i:08}");
        let started = std::time::Instant::now();
        store.add(&key, 1_700_000_000, 1)?;
        let took = started.elapsed();
        if took > worst {
            (worst, worst_at) = (took, i);
        }
    }
    println!("{keys} keys: longest add {worst:?}, at key {worst_at}");
    Ok(())
}
