//! One AWS SDK client per (service, region), built on first use and reused afterwards.

use crate::recent::RecentlyUsed;
use aws_config::retry::RetryConfig;
use std::sync::Mutex;

/// One HTTP attempt per mint. The operator retries throttling and errors itself, with backoff
/// capped at the current URL's last chance, and each of its attempts takes a token of the
/// client-side rate limit. The SDK's standard mode would add up to two attempts of its own,
/// without a token: a throttled account would be called at up to three times the configured
/// rate, just when it asked for less.
pub fn mint_retry_config() -> RetryConfig {
    RetryConfig::standard().with_max_attempts(1)
}

/// How many regions' clients one cache keeps. AWS has fewer than 40 regions, so a real workload
/// never reaches it; requests naming made-up regions (each a valid-looking name) cannot grow the
/// operator's memory without bound: the least recently used client is dropped instead.
pub const MAX_REGIONS: usize = 64;

/// Caches the clients of one service by region. SDK clients are cheap to clone (they share
/// their connection pool and credentials cache), so callers get a clone.
pub struct ClientCache<C> {
    base: aws_config::SdkConfig,
    build: fn(&aws_config::SdkConfig, &str) -> C,
    /// Region -> client.
    clients: Mutex<RecentlyUsed<String, C>>,
}

impl<C: Clone> ClientCache<C> {
    pub fn new(base: aws_config::SdkConfig, build: fn(&aws_config::SdkConfig, &str) -> C) -> Self {
        ClientCache {
            base,
            build,
            clients: Mutex::new(RecentlyUsed::default()),
        }
    }

    /// The client for `region`, building it on first use.
    pub fn get(&self, region: &str) -> C {
        // A poisoned lock only means another thread panicked while inserting; the map is still
        // usable, so recover it rather than propagate the panic.
        let mut clients = self
            .clients
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(client) = clients.get(region) {
            return client.clone();
        }
        if clients.len() >= MAX_REGIONS {
            clients.evict_least_recent(|_| true);
        }
        let client = (self.build)(&self.base, region);
        clients.insert(region.to_string(), client.clone());
        client
    }

    /// How many regional clients exist (for tests and diagnostics).
    pub fn len(&self) -> usize {
        self.clients.lock().map(|c| c.len()).unwrap_or_default()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(i: usize) -> String {
        format!("xx-test-{i}")
    }

    #[test]
    fn keeps_at_most_max_regions_dropping_the_least_recently_used() {
        let cache = ClientCache::new(aws_config::SdkConfig::builder().build(), |_, region| {
            region.to_string()
        });
        for i in 0..MAX_REGIONS {
            assert_eq!(cache.get(&region(i)), region(i));
        }
        // Region 0 is used again, so region 1 is now the least recently used.
        cache.get(&region(0));
        cache.get(&region(MAX_REGIONS));
        assert_eq!(cache.len(), MAX_REGIONS);
        let clients = cache.clients.lock().unwrap();
        assert!(clients.contains_key(&region(0)));
        assert!(!clients.contains_key(&region(1)));
        assert!(clients.contains_key(&region(MAX_REGIONS)));
    }
}
