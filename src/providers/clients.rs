//! One AWS SDK client per (service, region), built on first use and reused afterwards.

use std::collections::HashMap;
use std::sync::Mutex;

/// How many regions' clients one cache keeps. AWS has fewer than 40 regions, so a real workload
/// never reaches it; requests naming made-up regions (each a valid-looking name) cannot grow the
/// operator's memory without bound: the least recently used client is dropped instead.
pub const MAX_REGIONS: usize = 64;

/// Caches the clients of one service by region. SDK clients are cheap to clone (they share
/// their connection pool and credentials cache), so callers get a clone.
pub struct ClientCache<C> {
    base: aws_config::SdkConfig,
    build: fn(&aws_config::SdkConfig, &str) -> C,
    clients: Mutex<Clients<C>>,
}

struct Clients<C> {
    /// Region -> client and when it was last handed out (a use counter).
    by_region: HashMap<String, (C, u64)>,
    uses: u64,
}

impl<C: Clone> ClientCache<C> {
    pub fn new(base: aws_config::SdkConfig, build: fn(&aws_config::SdkConfig, &str) -> C) -> Self {
        ClientCache {
            base,
            build,
            clients: Mutex::new(Clients {
                by_region: HashMap::new(),
                uses: 0,
            }),
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
        clients.uses += 1;
        let now = clients.uses;
        if let Some((client, used)) = clients.by_region.get_mut(region) {
            *used = now;
            return client.clone();
        }
        if clients.by_region.len() >= MAX_REGIONS {
            let least_recent = clients
                .by_region
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(region, _)| region.clone());
            if let Some(region) = least_recent {
                clients.by_region.remove(&region);
            }
        }
        let client = (self.build)(&self.base, region);
        clients
            .by_region
            .insert(region.to_string(), (client.clone(), now));
        client
    }

    /// How many regional clients exist (for tests and diagnostics).
    pub fn len(&self) -> usize {
        self.clients
            .lock()
            .map(|c| c.by_region.len())
            .unwrap_or_default()
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
        assert!(clients.by_region.contains_key(&region(0)));
        assert!(!clients.by_region.contains_key(&region(1)));
        assert!(clients.by_region.contains_key(&region(MAX_REGIONS)));
    }
}
