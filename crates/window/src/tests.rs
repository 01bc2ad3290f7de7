//! Property tests: random sequences of adds and evictions against a plain
//! reference model, a `BTreeMap<(key, second), count>`. Counts straddle the
//! `u32` boundary, so entries switch between narrow and wide counters; keys
//! of all lengths exercise the entry header; and every check also reads the
//! store back through `iter` and `image`.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use crate::{StoreError, StoreLimits, WindowStore};

/// The obviously-correct model the store is checked against.
#[derive(Debug, Default)]
struct Model {
    max_keys: usize,
    counts: BTreeMap<(String, i64), u64>,
}

impl Model {
    fn keys(&self) -> BTreeSet<&str> {
        self.counts.keys().map(|(key, _)| key.as_str()).collect()
    }

    fn add(&mut self, key: &str, second: i64, count: u64) -> Result<(), StoreError> {
        if !(0..=i64::from(u32::MAX)).contains(&second) {
            return Err(StoreError::SecondOutOfRange { second });
        }
        if count == 0 {
            return Ok(());
        }
        let keys = self.keys();
        if !keys.contains(key) && keys.len() >= self.max_keys {
            return Err(StoreError::KeyLimit {
                limit: self.max_keys,
            });
        }
        let slot = self.counts.entry((key.to_owned(), second)).or_insert(0);
        *slot = slot.saturating_add(count);
        Ok(())
    }

    fn evict_before(&mut self, min_second: i64) -> usize {
        let before = self.counts.len();
        self.counts.retain(|(_, second), _| *second >= min_second);
        before - self.counts.len()
    }

    /// Sum of `key`'s counts with `lo <= second < hi` (i128 bounds).
    fn sum(&self, key: &str, lo: i128, hi: i128) -> u64 {
        self.counts
            .iter()
            .filter(|((k, s), _)| k == key && lo <= i128::from(*s) && i128::from(*s) < hi)
            .fold(0u64, |sum, (_, count)| sum.saturating_add(*count))
    }

    fn count(&self, key: &str, end: i64, window: u32) -> u64 {
        let end = i128::from(end);
        self.sum(key, end - i128::from(window) + 1, end + 1)
    }

    fn series(&self, key: &str, start: i64, step: u32, points: u32) -> Vec<u64> {
        let step = i128::from(step.max(1));
        (0..points)
            .map(|i| {
                let lo = i128::from(start) + i128::from(i) * step;
                self.sum(key, lo, lo + step)
            })
            .collect()
    }

    fn top(&self, end: i64, window: u32, limit: usize, prefix: &str) -> Vec<(String, u64)> {
        let mut all: Vec<(String, u64)> = self
            .keys()
            .into_iter()
            .filter(|key| key.starts_with(prefix))
            .map(|key| (key.to_owned(), self.count(key, end, window)))
            .filter(|(_, count)| *count > 0)
            .collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(limit);
        all
    }
}

#[derive(Clone, Debug)]
enum Op {
    Add {
        key: String,
        second: i64,
        count: u64,
    },
    Evict {
        min_second: i64,
    },
    /// The same pass, run `buckets` buckets at a time with the store read between steps.
    EvictInSteps {
        min_second: i64,
        buckets: usize,
    },
}

#[derive(Clone, Debug)]
enum Query {
    Count {
        end: i64,
        window: u32,
    },
    Series {
        start: i64,
        step: u32,
        points: u32,
    },
    Top {
        end: i64,
        window: u32,
        limit: usize,
        prefix: String,
    },
}

/// Keys from a two-letter alphabet, so keys collide and prefix one another.
fn key() -> impl Strategy<Value = String> {
    "[ab]{0,3}"
}

/// Every key `key()` can produce, plus one it never produces.
fn all_keys() -> Vec<String> {
    let mut keys = vec![String::new(), "c".to_owned()];
    for len in 1..=3 {
        for bits in 0..(1u32 << len) {
            keys.push(
                (0..len)
                    .map(|i| if bits >> i & 1 == 1 { 'b' } else { 'a' })
                    .collect(),
            );
        }
    }
    keys
}

/// Mostly a small range, so windows overlap; sometimes the edges of `u32`
/// and invalid seconds.
fn second() -> impl Strategy<Value = i64> {
    prop_oneof![
        20 => -2i64..40,
        1 => Just(i64::from(u32::MAX)),
        1 => Just(i64::from(u32::MAX) + 1),
        1 => Just(i64::MIN),
    ]
}

/// Mostly small counts; sometimes huge ones, to exercise saturation, and
/// ones around `u32::MAX`, where an entry turns wide.
fn count() -> impl Strategy<Value = u64> {
    prop_oneof![
        10 => 0u64..5,
        1 => Just(u64::MAX),
        1 => (u64::MAX / 2)..u64::MAX,
        1 => (1u64 << 32)..(1u64 << 33),
        1 => (u64::from(u32::MAX) - 3)..=(u64::from(u32::MAX) + 1),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (key(), second(), count()).prop_map(|(key, second, count)| Op::Add { key, second, count }),
        1 => second().prop_map(|min_second| Op::Evict { min_second }),
        1 => (second(), 1usize..20).prop_map(|(min_second, buckets)| Op::EvictInSteps { min_second, buckets }),
    ]
}

fn end() -> impl Strategy<Value = i64> {
    prop_oneof![
        10 => -3i64..45,
        1 => Just(i64::from(u32::MAX)),
        1 => Just(i64::MAX),
        1 => Just(i64::MIN),
    ]
}

fn window() -> impl Strategy<Value = u32> {
    prop_oneof![10 => 0u32..45, 1 => Just(u32::MAX)]
}

fn query() -> impl Strategy<Value = Query> {
    prop_oneof![
        (end(), window()).prop_map(|(end, window)| Query::Count { end, window }),
        (
            end(),
            prop_oneof![5 => 0u32..8, 1 => Just(u32::MAX)],
            0u32..12
        )
            .prop_map(|(start, step, points)| Query::Series {
                start,
                step,
                points
            }),
        (end(), window(), 0usize..6, "[ab]{0,2}").prop_map(|(end, window, limit, prefix)| {
            Query::Top {
                end,
                window,
                limit,
                prefix,
            }
        }),
    ]
}

fn max_keys() -> impl Strategy<Value = usize> {
    prop_oneof![0usize..8, Just(usize::MAX)]
}

/// Everything `iter` yields, sorted by key: `(key, [(second, count)])`.
fn contents<'a, C>(items: impl Iterator<Item = (&'a str, C)>) -> Vec<(String, Vec<(i64, u64)>)>
where
    C: Iterator<Item = (i64, u64)>,
{
    let mut all: Vec<(String, Vec<(i64, u64)>)> = items
        .map(|(key, counters)| (key.to_owned(), counters.collect()))
        .collect();
    all.sort();
    all
}

/// The model's contents in the shape of [`contents`].
fn model_contents(model: &Model) -> Vec<(String, Vec<(i64, u64)>)> {
    let mut all: Vec<(String, Vec<(i64, u64)>)> = Vec::new();
    for ((key, second), count) in &model.counts {
        match all.last_mut() {
            Some((last, counters)) if last == key => counters.push((*second, *count)),
            _ => all.push((key.clone(), vec![(*second, *count)])),
        }
    }
    all
}

/// Checks that `iter` and a fresh `image` both yield exactly the model.
fn check_contents(store: &WindowStore, model: &Model) {
    let expected = model_contents(model);
    assert_eq!(contents(store.iter()), expected, "iter");
    let image = store.image();
    assert_eq!(image.key_count(), store.key_count(), "image key_count");
    assert_eq!(
        image.counter_count(),
        store.counter_count(),
        "image counter_count"
    );
    assert_eq!(contents(image.iter()), expected, "image");
}

/// Compares every observable of `store` with `model`.
fn check(store: &WindowStore, model: &Model, queries: &[Query], keys: &[String]) {
    store.check_invariants();
    assert_eq!(store.key_count(), model.keys().len(), "key_count");
    assert_eq!(store.counter_count(), model.counts.len(), "counter_count");
    check_contents(store, model);
    for query in queries {
        match query {
            Query::Count { end, window } => {
                for key in keys {
                    assert_eq!(
                        store.count(key, *end, *window),
                        model.count(key, *end, *window),
                        "count({key:?}, {end}, {window})"
                    );
                }
            }
            Query::Series {
                start,
                step,
                points,
            } => {
                for key in keys {
                    assert_eq!(
                        store.series(key, *start, *step, *points),
                        model.series(key, *start, *step, *points),
                        "series({key:?}, {start}, {step}, {points})"
                    );
                }
            }
            Query::Top {
                end,
                window,
                limit,
                prefix,
            } => {
                assert_eq!(
                    store.top(*end, *window, *limit, prefix),
                    model.top(*end, *window, *limit, prefix),
                    "top({end}, {window}, {limit}, {prefix:?})"
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// After every add or eviction, the store answers exactly as the model.
    #[test]
    fn store_matches_model(
        max_keys in max_keys(),
        ops in prop::collection::vec(op(), 0..40),
        queries in prop::collection::vec(query(), 1..6),
    ) {
        let keys = all_keys();
        let mut store = WindowStore::new(StoreLimits { max_keys });
        let mut model = Model { max_keys, ..Model::default() };
        for op in &ops {
            match op {
                Op::Add { key, second, count } => {
                    prop_assert_eq!(
                        store.add(key, *second, *count),
                        model.add(key, *second, *count),
                        "add({:?}, {}, {})", key, second, count
                    );
                }
                Op::Evict { min_second } => {
                    prop_assert_eq!(
                        store.evict_before(*min_second),
                        model.evict_before(*min_second),
                        "evict_before({})", min_second
                    );
                }
                Op::EvictInSteps { min_second, buckets } => {
                    let mut pass = store.eviction(*min_second);
                    while !store.evict_step(&mut pass, *buckets) {
                        // Between steps a key is seen before or after its eviction; either
                        // way a window inside the retained seconds reads as the model (which
                        // has not evicted yet).
                        for query in &queries {
                            if let Query::Count { end, window } = query {
                                if end.saturating_sub(i64::from(*window)).saturating_add(1) >= *min_second {
                                    for key in &keys {
                                        prop_assert_eq!(
                                            store.count(key, *end, *window),
                                            model.count(key, *end, *window)
                                        );
                                    }
                                }
                            }
                        }
                    }
                    prop_assert_eq!(
                        pass.dropped(),
                        model.evict_before(*min_second),
                        "evict in steps of {} buckets before {}", buckets, min_second
                    );
                }
            }
            check(&store, &model, &queries, &keys);
        }
    }

    /// The order hits arrive in does not matter: in order, reversed and
    /// shuffled give the same store.
    #[test]
    fn arrival_order_does_not_matter(
        hits in prop::collection::vec((key(), 0i64..60, 1u64..100), 0..60),
        shuffled in any::<u64>(),
    ) {
        let build = |hits: &[(String, i64, u64)]| -> Result<WindowStore, StoreError> {
            let mut store = WindowStore::default();
            for (key, second, count) in hits {
                store.add(key, *second, *count)?;
            }
            Ok(store)
        };
        let mut sorted = hits.clone();
        sorted.sort_by_key(|(_, second, _)| *second);
        let mut reversed = sorted.clone();
        reversed.reverse();
        // A deterministic shuffle from the drawn seed.
        let mut mixed = hits.clone();
        let mut seed = shuffled | 1;
        for i in (1..mixed.len()).rev() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            mixed.swap(i, (seed % (i as u64 + 1)) as usize);
        }
        let stores = [build(&hits), build(&sorted), build(&reversed), build(&mixed)];
        let keys = all_keys();
        for store in &stores {
            let store = store.as_ref().map_err(|e| TestCaseError::fail(e.to_string()))?;
            store.check_invariants();
            let first = stores[0].as_ref().map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(store.counter_count(), first.counter_count());
            for key in &keys {
                prop_assert_eq!(store.series(key, 0, 1, 60), first.series(key, 0, 1, 60));
            }
            prop_assert_eq!(store.top(59, 60, 100, ""), first.top(59, 60, 100, ""));
        }
    }
}

/// Keys of every header size: empty, short, around the 63-byte boundary where
/// the length leaves the tag, around 63 + 128 where its varint takes a second
/// byte, and multi-byte UTF-8.
fn long_key() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-c]{0,4}",
        "[a-c]{60,66}",
        "[a-c]{188,194}",
        "[a-cé✓]{1,80}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Keys of any length, long runs of seconds in any order and evictions:
    /// entries grow, shrink, keep spare slots and turn wide and narrow again,
    /// and the store still reads back exactly as the model.
    #[test]
    fn any_keys_and_long_series_match_model(
        keys in prop::collection::vec(long_key(), 1..6),
        hits in prop::collection::vec((0usize..6, 0i64..400, count()), 0..300),
        evictions in prop::collection::vec((0usize..300, 0i64..420), 0..4),
    ) {
        let mut store = WindowStore::default();
        let mut model = Model { max_keys: usize::MAX, ..Model::default() };
        for (i, (key, second, count)) in hits.iter().enumerate() {
            let key = &keys[key % keys.len()];
            prop_assert_eq!(store.add(key, *second, *count), model.add(key, *second, *count));
            for (at, min_second) in &evictions {
                if *at == i {
                    prop_assert_eq!(store.evict_before(*min_second), model.evict_before(*min_second));
                }
            }
        }
        store.check_invariants();
        check_contents(&store, &model);
        for key in &keys {
            prop_assert_eq!(store.count(key, 500, 600), model.count(key, 500, 600));
            prop_assert_eq!(store.series(key, -5, 37, 12), model.series(key, -5, 37, 12));
        }
    }
}

#[test]
fn removing_keys_frees_them_and_leaves_the_others() {
    let mut store = WindowStore::new(StoreLimits { max_keys: 1000 });
    for i in 0..600 {
        store
            .add(&format!("k{i}"), 100 + i64::from(i % 3), 1)
            .expect("room");
        store.add(&format!("k{i}"), 200, 2).expect("room");
    }
    let before = store.approx_heap_bytes();
    let removed = store.remove_keys_where(|key| key.ends_with('0') || key.ends_with('5'));
    assert_eq!(removed, 120);
    assert_eq!(store.key_count(), 480);
    assert_eq!(store.counter_count(), 960);
    assert!(store.approx_heap_bytes() < before);
    assert_eq!(store.count("k10", 300, 300), 0);
    assert_eq!(store.count("k11", 300, 300), 3);
    // Removed keys free their room under the key limit.
    for i in 0..520 {
        store.add(&format!("new{i}"), 100, 1).expect("room again");
    }
    // top_where ranks only the kept keys.
    let top = store.top_where(300, 300, 3, "k", |key| key.ends_with('1'));
    assert!(top.iter().all(|(key, _)| key.ends_with('1')), "{top:?}");
    assert_eq!(top.len(), 3);
}
