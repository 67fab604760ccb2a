//! A small, bounded, thread-shared LRU cache for format metadata (qcow2 L2 tables) and
//! recently inflated compressed clusters.
//!
//! Readers serve many threads at once, so the cache is split into shards, each behind its
//! own mutex; a lookup locks one shard for a few comparisons and never across I/O (a miss
//! is filled by the caller, outside any lock, then inserted). Every shard holds at most
//! `budget / shards` bytes of values (at least one entry), so memory stays bounded however
//! large or hostile the image is. Lookups are hash lookups; eviction, which only happens
//! on a miss (after a `pread` far costlier), scans its shard for the oldest entry rather
//! than maintaining a linked list.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::{Mutex, PoisonError};

/// Number of independently locked shards; a power of two a little above the core count
/// of the machines this runs on keeps contention negligible.
const SHARDS: usize = 16;

struct Entry<V> {
    value: V,
    weight: usize,
    last_use: u64,
}

struct Shard<K, V> {
    entries: HashMap<K, Entry<V>>,
    weight: usize,
    clock: u64,
}

/// An LRU map from `K` to cheaply clonable `V` (an `Arc`), bounded by total weight.
pub(crate) struct LruCache<K, V> {
    shards: Box<[Mutex<Shard<K, V>>]>,
    shard_budget: usize,
    hasher: std::collections::hash_map::RandomState,
}

impl<K: Hash + Eq + Copy, V: Clone> LruCache<K, V> {
    /// A cache holding at most about `budget` bytes of values (each value's weight is
    /// given at insertion).
    pub(crate) fn new(budget: usize) -> LruCache<K, V> {
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    entries: HashMap::new(),
                    weight: 0,
                    clock: 0,
                })
            })
            .collect();
        LruCache {
            shards,
            shard_budget: budget.div_ceil(SHARDS).max(1),
            hasher: Default::default(),
        }
    }

    fn shard(&self, key: &K) -> &Mutex<Shard<K, V>> {
        let h = self.hasher.hash_one(key) as usize;
        &self.shards[h % SHARDS]
    }

    /// The value cached under `key`, marked as recently used.
    pub(crate) fn get(&self, key: &K) -> Option<V> {
        // A panic while holding a shard cannot leave it inconsistent (every update is a
        // few plain field writes), so a poisoned lock is still safe to use.
        let mut shard = self
            .shard(key)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        shard.clock += 1;
        let now = shard.clock;
        let e = shard.entries.get_mut(key)?;
        e.last_use = now;
        Some(e.value.clone())
    }

    /// Caches `value` (of `weight` bytes) under `key`, evicting the least recently used
    /// entries of its shard to stay within budget. A racing insert of the same key keeps
    /// the first value (both are equal: the cached data is immutable).
    pub(crate) fn insert(&self, key: K, value: V, weight: usize) {
        let mut shard = self
            .shard(&key)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if shard.entries.contains_key(&key) {
            return;
        }
        while shard.weight + weight > self.shard_budget {
            let oldest = shard
                .entries
                .iter()
                .min_by_key(|(_, e)| e.last_use)
                .map(|(k, _)| *k);
            let Some(k) = oldest else { break };
            if let Some(gone) = shard.entries.remove(&k) {
                shard.weight -= gone.weight;
            }
        }
        shard.clock += 1;
        let now = shard.clock;
        shard.weight += weight;
        shard.entries.insert(
            key,
            Entry {
                value,
                weight,
                last_use: now,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_returns_what_was_inserted_and_stays_within_budget() {
        let cache: LruCache<u64, u64> = LruCache::new(SHARDS * 4);
        for k in 0..1000u64 {
            cache.insert(k, k * 2, 1);
            assert_eq!(cache.get(&k), Some(k * 2));
        }
        let held: usize = cache
            .shards
            .iter()
            .map(|s| s.lock().unwrap().entries.len())
            .sum();
        assert!(held <= SHARDS * 4, "cache holds {held} entries");
    }

    #[test]
    fn cache_evicts_the_least_recently_used_entry_first() {
        let cache: LruCache<u64, u64> = LruCache::new(SHARDS * 2);
        // Find three keys that land in one shard, so eviction order is observable.
        let shard_of = |k: &u64| cache.hasher.hash_one(k) as usize % SHARDS;
        let keys: Vec<u64> = (0..10_000u64)
            .filter(|k| shard_of(k) == shard_of(&0))
            .take(3)
            .collect();
        cache.insert(keys[0], 0, 1);
        cache.insert(keys[1], 1, 1);
        assert_eq!(cache.get(&keys[0]), Some(0));
        cache.insert(keys[2], 2, 1);
        assert_eq!(cache.get(&keys[0]), Some(0), "recently used entry kept");
        assert_eq!(
            cache.get(&keys[1]),
            None,
            "least recently used entry evicted"
        );
        assert_eq!(cache.get(&keys[2]), Some(2));
    }
}
