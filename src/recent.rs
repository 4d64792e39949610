//! A map that remembers when each entry was last used, so a bounded cache can drop the least
//! recently used one. Shared by the SDK client cache and the assumed-role identities.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;

pub struct RecentlyUsed<K, V> {
    /// Each value and when it was last used (a use counter).
    entries: HashMap<K, (V, u64)>,
    uses: u64,
}

impl<K: Eq + Hash + Clone, V> Default for RecentlyUsed<K, V> {
    fn default() -> Self {
        RecentlyUsed {
            entries: HashMap::new(),
            uses: 0,
        }
    }
}

impl<K: Eq + Hash + Clone, V> RecentlyUsed<K, V> {
    /// The value of `key`, marked as just used.
    pub fn get<Q>(&mut self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        self.uses += 1;
        let now = self.uses;
        self.entries.get_mut(key).map(|(value, used)| {
            *used = now;
            &*value
        })
    }

    /// Drops the least recently used entry among those `among` picks, if any.
    pub fn evict_least_recent(&mut self, among: impl Fn(&K) -> bool) {
        let least_recent = self
            .entries
            .iter()
            .filter(|(key, _)| among(key))
            .min_by_key(|(_, (_, used))| *used)
            .map(|(key, _)| key.clone());
        if let Some(key) = least_recent {
            self.entries.remove(&key);
        }
    }

    /// Adds `value` under `key`, marked as just used.
    pub fn insert(&mut self, key: K, value: V) {
        self.uses += 1;
        self.entries.insert(key, (value, self.uses));
    }

    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.entries.keys()
    }

    pub fn contains_key(&self, key: &K) -> bool {
        self.entries.contains_key(key)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
