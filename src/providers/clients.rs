//! One AWS SDK client per (service, region), built on first use and reused afterwards.

use std::collections::HashMap;
use std::sync::Mutex;

/// Caches the clients of one service by region. SDK clients are cheap to clone (they share
/// their connection pool and credentials cache), so callers get a clone.
pub struct ClientCache<C> {
    base: aws_config::SdkConfig,
    build: fn(&aws_config::SdkConfig, &str) -> C,
    clients: Mutex<HashMap<String, C>>,
}

impl<C: Clone> ClientCache<C> {
    pub fn new(base: aws_config::SdkConfig, build: fn(&aws_config::SdkConfig, &str) -> C) -> Self {
        ClientCache {
            base,
            build,
            clients: Mutex::new(HashMap::new()),
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
        clients
            .entry(region.to_string())
            .or_insert_with(|| (self.build)(&self.base, region))
            .clone()
    }

    /// How many regional clients exist (for tests and diagnostics).
    pub fn len(&self) -> usize {
        self.clients.lock().map(|c| c.len()).unwrap_or_default()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
