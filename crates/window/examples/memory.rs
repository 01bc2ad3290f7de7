//! Measures what a [`WindowStore`] costs per (key, second) counter, as process
//! RSS growth, and how fast it fills.
//!
//! The workload is the project's memory benchmark (`hitcounter-bench`'s
//! memory workload): `--keys` keys (default 1,000,000) named like
//! `bench-0000123456` (16 bytes), each hit `--hits` times (default 10) at
//! random seconds spread over a `--span`-second span (default 300). The seconds
//! come from an inline splitmix64 generator with a fixed seed, so every run
//! stores exactly the same counters. Two arrival orders:
//!
//! * `--order keyed` (the default, as the benchmark loads its plan): key after
//!   key, each key's seconds sorted with the hits of one second summed, so each
//!   add appends a new newest second and a key's entry grows in one go.
//! * `--order shuffled`: in rounds, each visiting every key once in a fresh
//!   random order with one hit at a random second, so the entries of all keys
//!   grow in turn, hits land out of order, and the allocator's free lists churn.
//!   This is the harsher case for memory (fragmentation) and for speed.
//!
//! Afterwards it times the hot paths on the filled store, visiting keys in a
//! random order (so that no key is found where the previous one was): one add
//! per key at a new newest second (the entry grows by one counter), adds to
//! that same second (nothing grows), window counts, and finally the flat
//! checkpoint image.
//!
//! ```text
//! cargo run --release -p hitcounter-window --example memory -- --keys 100000
//! cargo run --release -p hitcounter-window --example memory -- --order shuffled
//! ```

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Instant;

use hitcounter_window::{StoreLimits, WindowStore};

/// First second of the span: a realistic Unix time, so seconds use all of
/// their 32 bits as in production.
const BASE_SECOND: i64 = 1_700_000_000;
/// Length of every generated key name: `bench-` and ten digits.
const KEY_LEN: usize = 16;
/// Adds per key at the already-newest second in the hot-path timing.
const SAME_SECOND_ADDS: usize = 4;

/// How the hits of the fill arrive; see the module docs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Order {
    Keyed,
    Shuffled,
}

/// The knobs of one run.
struct Options {
    keys: usize,
    hits: usize,
    span: u64,
    order: Order,
}

fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        keys: 1_000_000,
        hits: 10,
        span: 300,
        order: Order::Keyed,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = |what: &str| -> Result<usize, String> {
            value
                .replace('_', "")
                .parse::<usize>()
                .map_err(|e| format!("{what} {value:?}: {e}"))
        };
        match flag.as_str() {
            "--keys" => options.keys = number("--keys")?,
            "--hits" => options.hits = number("--hits")?,
            "--span" => options.span = number("--span")?.max(1) as u64,
            "--order" => {
                options.order = match value.as_str() {
                    "keyed" => Order::Keyed,
                    "shuffled" => Order::Shuffled,
                    other => return Err(format!("--order {other:?}: expected keyed or shuffled")),
                }
            }
            other => {
                return Err(format!(
                    "unknown flag {other} (expected --keys, --hits, --span, --order)"
                ))
            }
        }
    }
    Ok(options)
}

/// splitmix64: tiny, fast and good enough to scatter seconds.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `0..bound` (`bound` > 0).
    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
}

/// Fisher-Yates shuffle.
fn shuffle(order: &mut [usize], rng: &mut SplitMix64) {
    for i in (1..order.len()).rev() {
        // The remainder is at most i, a usize.
        let j = usize::try_from(rng.below(i as u64 + 1)).unwrap_or(i);
        order.swap(i, j);
    }
}

/// The process's resident set size in bytes, from `/proc/self/status`
/// (0 where that file does not exist).
fn rss_bytes() -> u64 {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return 0;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kib| kib * 1024)
}

/// All key names concatenated, `KEY_LEN` bytes each, built before the first
/// RSS reading so that the names' own memory is not charged to the store.
fn key_names(keys: usize) -> String {
    let mut names = String::with_capacity(keys * KEY_LEN);
    for key in 0..keys {
        // Writing to a String cannot fail.
        let _ = write!(names, "bench-{key:010}");
    }
    names
}

fn key_name(names: &str, key: usize) -> &str {
    &names[key * KEY_LEN..(key + 1) * KEY_LEN]
}

fn per_second(operations: usize, seconds: f64) -> f64 {
    operations as f64 / seconds.max(1e-9)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1_048_576.0
}

/// The keyed fill's hits, drawn up front and kept until the RSS has been
/// read, so that their memory is not charged to the store: for each key in
/// turn, its distinct seconds (as offsets into the span) in increasing order
/// with the number of hits of each.
struct Plan {
    /// `(key, offset, count)` in arrival order.
    hits: Vec<(u32, u32, u32)>,
}

impl Plan {
    fn new(options: &Options, rng: &mut SplitMix64) -> Self {
        let mut hits = Vec::with_capacity(options.keys * options.hits);
        let mut offsets = Vec::with_capacity(options.hits);
        for key in 0..options.keys {
            offsets.clear();
            offsets.extend((0..options.hits).map(|_| rng.below(options.span)));
            offsets.sort_unstable();
            // Offsets are below the span; keys and hits are counts of things
            // in memory. All fit u32 in any run that fits in RAM.
            let key = u32::try_from(key).unwrap_or(u32::MAX);
            let mut previous = None;
            for &offset in &offsets {
                let offset = u32::try_from(offset).unwrap_or(u32::MAX);
                if previous == Some(offset) {
                    if let Some((_, _, count)) = hits.last_mut() {
                        *count += 1;
                    }
                } else {
                    hits.push((key, offset, 1));
                }
                previous = Some(offset);
            }
        }
        Self { hits }
    }
}

/// Fills `store`; returns the number of `add` calls and the seconds they took.
fn fill(
    store: &mut WindowStore,
    names: &str,
    options: &Options,
    plan: &Plan,
    order: &mut [usize],
    rng: &mut SplitMix64,
) -> Result<(usize, f64), String> {
    let mut adds = 0;
    let mut seconds = 0.0;
    let failed = |e| format!("add failed: {e}");
    match options.order {
        Order::Keyed => {
            let started = Instant::now();
            for &(key, offset, count) in &plan.hits {
                let key = key_name(names, key as usize);
                store
                    .add(key, BASE_SECOND + i64::from(offset), u64::from(count))
                    .map_err(failed)?;
            }
            seconds += started.elapsed().as_secs_f64();
            adds += plan.hits.len();
        }
        Order::Shuffled => {
            for _round in 0..options.hits {
                shuffle(order, rng);
                let started = Instant::now();
                for &key in order.iter() {
                    // offset < span, which fits an i64.
                    let offset = i64::try_from(rng.below(options.span)).unwrap_or(0);
                    store
                        .add(key_name(names, key), BASE_SECOND + offset, 1)
                        .map_err(failed)?;
                }
                seconds += started.elapsed().as_secs_f64();
                adds += order.len();
            }
        }
    }
    Ok((adds, seconds))
}

fn main() -> ExitCode {
    let options = match parse_options() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("memory: {message}");
            return ExitCode::FAILURE;
        }
    };
    let names = key_names(options.keys);
    let mut order: Vec<usize> = (0..options.keys).collect();
    let mut rng = SplitMix64(0x5EED);
    let mut store = WindowStore::new(StoreLimits {
        max_keys: usize::MAX,
    });

    let plan = match options.order {
        Order::Keyed => Plan::new(&options, &mut rng),
        Order::Shuffled => Plan { hits: Vec::new() },
    };

    let rss_before = rss_bytes();
    let filled = fill(&mut store, &names, &options, &plan, &mut order, &mut rng);
    let (adds, fill_seconds) = match filled {
        Ok(done) => done,
        Err(message) => {
            eprintln!("memory: {message}");
            return ExitCode::FAILURE;
        }
    };
    let rss_after = rss_bytes();
    drop(plan);

    let counters = store.counter_count();
    let growth = rss_after.saturating_sub(rss_before);
    let approx = store.approx_heap_bytes();
    let per_counter = |bytes: u64| bytes as f64 / counters.max(1) as f64;
    let order_name = match options.order {
        Order::Keyed => "keyed",
        Order::Shuffled => "shuffled",
    };
    println!("order                {order_name}");
    println!("keys                 {}", store.key_count());
    println!("counters             {counters}");
    println!(
        "RSS growth           {growth} bytes ({:.1} MiB)",
        mib(growth)
    );
    println!("RSS bytes/counter    {:.2}", per_counter(growth));
    println!(
        "approx_heap_bytes    {approx} ({:.2} bytes/counter)",
        per_counter(approx as u64)
    );
    println!(
        "fill                 {adds} adds in {fill_seconds:.3} s = {:.0} adds/s",
        per_second(adds, fill_seconds)
    );

    // Hot path: a new newest second per key (every entry grows by one counter).
    let newest = BASE_SECOND + i64::try_from(options.span).unwrap_or(0);
    shuffle(&mut order, &mut rng);
    let started = Instant::now();
    for &key in &order {
        let _ = store.add(key_name(&names, key), newest, 1);
    }
    let append_seconds = started.elapsed().as_secs_f64();
    println!(
        "append new second    {:.0} adds/s",
        per_second(options.keys, append_seconds)
    );

    // Hot path: more hits in that same second (nothing grows).
    let started = Instant::now();
    for _ in 0..SAME_SECOND_ADDS {
        for &key in &order {
            let _ = store.add(key_name(&names, key), newest, 1);
        }
    }
    let same_seconds = started.elapsed().as_secs_f64();
    println!(
        "add same second      {:.0} adds/s",
        per_second(options.keys * SAME_SECOND_ADDS, same_seconds)
    );
    // A key hit several times in a second: only its first hit grows it.
    println!(
        "mix 1 new + {SAME_SECOND_ADDS} same   {:.0} adds/s",
        per_second(
            options.keys * (1 + SAME_SECOND_ADDS),
            append_seconds + same_seconds
        )
    );

    // Read path: each key's count over the whole span.
    let window = u32::try_from(options.span + 1).unwrap_or(u32::MAX);
    let mut total = 0u64;
    let started = Instant::now();
    for &key in &order {
        total = total.wrapping_add(store.count(key_name(&names, key), newest, window));
    }
    println!(
        "count                {:.0} counts/s (sum {total})",
        per_second(options.keys, started.elapsed().as_secs_f64())
    );

    // -- image --
    // The checkpoint snapshot: built in one pass, one buffer.
    let rss_before_image = rss_bytes();
    let started = Instant::now();
    let image = store.image();
    let image_seconds = started.elapsed().as_secs_f64();
    let image_growth = rss_bytes().saturating_sub(rss_before_image);
    let image_counters: usize = image.iter().map(|(_, counters)| counters.count()).sum();
    println!(
        "image                {} keys, {} counters, {:.1} MiB ({:.2} bytes/counter), \
         RSS +{:.1} MiB, built in {:.3} s",
        image.key_count(),
        image_counters,
        mib(image.heap_bytes() as u64),
        image.heap_bytes() as f64 / image_counters.max(1) as f64,
        mib(image_growth),
        image_seconds
    );
    // -- end image --
    ExitCode::SUCCESS
}
