//! The longest single `add` while a store grows to `N` keys (default 1,000,000).
//!
//! Growing the key table moves every key's slot to a table twice the size;
//! the owner of the store answers nothing meanwhile. This prints the worst
//! add and the key count it happened at, which is where the table grew.
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
