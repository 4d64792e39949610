//! What the operator knows about the Secrets it owns, without holding their data.
//!
//! The Secret watch is metadata-only and selects the managed-by label, so neither other Secrets
//! nor any URL is ever held in memory. The data facts a reconcile needs (the digest of the URL,
//! its use-by time) are recorded from the operator's own writes and reads, each at the
//! `resourceVersion` it saw. A watch event at the same `resourceVersion` changes nothing (it is
//! the echo of the operator's own write, and triggers no reconcile); one at another
//! `resourceVersion` means someone else changed the Secret, so its data is unknown until the
//! next reconcile reads it again.

use crate::secret::SecretSnapshot;
use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::watcher;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

type Key = (Box<str>, Box<str>);

/// Snapshots of the operator's own Secrets, by namespace and name.
#[derive(Default)]
pub struct SecretCache {
    state: Mutex<State>,
    synced: AtomicBool,
}

#[derive(Default)]
struct State {
    entries: HashMap<Key, SecretSnapshot>,
    /// Keys seen during a (re)list in progress; the others are dropped when it ends.
    relisting: Option<HashSet<Key>>,
}

/// What the cache can say about one Secret.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The Secret as of its latest known `resourceVersion`, data facts included.
    Known(SecretSnapshot),
    /// Not cached, or changed by someone else since the operator last read it: read it.
    Unknown,
}

impl SecretCache {
    pub fn get(&self, namespace: &str, name: &str) -> Lookup {
        let state = self.lock();
        match state.entries.get(&key(namespace, name)) {
            Some(snapshot) if snapshot.data.is_some() => Lookup::Known(snapshot.clone()),
            _ => Lookup::Unknown,
        }
    }

    /// Records a Secret the operator has just written or read in full. Secrets without the
    /// managed-by label are not recorded: the watch would never tell of their changes.
    pub fn record(&self, secret: &Secret) {
        let snapshot = SecretSnapshot::of(secret);
        let key = key(
            secret.metadata.namespace.as_deref().unwrap_or_default(),
            secret.metadata.name.as_deref().unwrap_or_default(),
        );
        let mut state = self.lock();
        if snapshot.is_labelled() {
            state.entries.insert(key, snapshot);
        } else {
            state.entries.remove(&key);
        }
    }

    /// Whether the first listing has completed.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// Number of Secrets cached.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies one event of the metadata-only watch. Returns the Secret if its owner should be
    /// reconciled: it appeared, changed under someone else's hand, or went away.
    pub fn observe(
        &self,
        event: watcher::Event<PartialObjectMeta<Secret>>,
    ) -> Option<PartialObjectMeta<Secret>> {
        let mut state = self.lock();
        match event {
            watcher::Event::Apply(meta) => state.apply(meta),
            watcher::Event::Delete(meta) => {
                state.entries.remove(&meta_key(&meta));
                Some(meta)
            }
            watcher::Event::Init => {
                state.relisting = Some(HashSet::new());
                None
            }
            watcher::Event::InitApply(meta) => {
                if let Some(seen) = state.relisting.as_mut() {
                    seen.insert(meta_key(&meta));
                }
                state.apply(meta)
            }
            watcher::Event::InitDone => {
                // Secrets deleted while the watch was down get no Delete event: drop them here.
                // Their owners are reconciled by the controller's reconcile-all after a relist.
                if let Some(seen) = state.relisting.take() {
                    state.entries.retain(|key, _| seen.contains(key));
                }
                self.synced.store(true, Ordering::Release);
                None
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is plain data, consistent after every statement: usable after a panic.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl State {
    fn apply(&mut self, meta: PartialObjectMeta<Secret>) -> Option<PartialObjectMeta<Secret>> {
        let key = meta_key(&meta);
        let version = meta.metadata.resource_version.as_deref();
        if let Some(known) = self.entries.get(&key)
            && known.resource_version.as_deref() == version
        {
            // Already known at this version: the echo of the operator's own write, or a relist.
            return None;
        }
        self.entries
            .insert(key, SecretSnapshot::of_metadata(&meta.metadata, None));
        Some(meta)
    }
}

fn key(namespace: &str, name: &str) -> Key {
    (namespace.into(), name.into())
}

fn meta_key(meta: &PartialObjectMeta<Secret>) -> Key {
    key(
        meta.metadata.namespace.as_deref().unwrap_or_default(),
        meta.metadata.name.as_deref().unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::{MANAGED_BY_LABEL, MANAGED_BY_VALUE};
    use k8s_openapi::ByteString;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

    fn secret(version: &str, labelled: bool) -> Secret {
        Secret {
            metadata: ObjectMeta {
                namespace: Some("team".into()),
                name: Some("sales-url".into()),
                resource_version: Some(version.into()),
                labels: labelled
                    .then(|| [(MANAGED_BY_LABEL.to_string(), MANAGED_BY_VALUE.to_string())].into()),
                owner_references: Some(vec![OwnerReference {
                    controller: Some(true),
                    uid: "uid-1".into(),
                    kind: "EmbedUrlRequest".into(),
                    name: "sales".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            },
            data: Some(
                [(
                    "url".to_string(),
                    ByteString(b"https://example.test/secret".to_vec()),
                )]
                .into(),
            ),
            type_: Some("Opaque".into()),
            ..Default::default()
        }
    }

    fn meta(version: &str) -> PartialObjectMeta<Secret> {
        PartialObjectMeta {
            metadata: secret(version, true).metadata,
            ..Default::default()
        }
    }

    #[test]
    fn own_writes_are_known_and_their_echo_triggers_nothing() {
        let cache = SecretCache::default();
        assert_eq!(cache.get("team", "sales-url"), Lookup::Unknown);
        cache.record(&secret("7", true));
        let Lookup::Known(snapshot) = cache.get("team", "sales-url") else {
            panic!("recorded");
        };
        assert!(snapshot.data.is_some());
        assert!(
            !format!("{snapshot:?}").contains("example.test"),
            "no URL kept"
        );
        assert!(cache.observe(watcher::Event::Apply(meta("7"))).is_none());
        assert!(matches!(cache.get("team", "sales-url"), Lookup::Known(_)));
    }

    #[test]
    fn someone_elses_change_makes_the_data_unknown_and_triggers() {
        let cache = SecretCache::default();
        cache.record(&secret("7", true));
        assert!(cache.observe(watcher::Event::Apply(meta("8"))).is_some());
        assert_eq!(cache.get("team", "sales-url"), Lookup::Unknown);
        // Reading it again makes it known.
        cache.record(&secret("8", true));
        assert!(matches!(cache.get("team", "sales-url"), Lookup::Known(_)));
        assert!(cache.observe(watcher::Event::Delete(meta("8"))).is_some());
        assert_eq!(cache.get("team", "sales-url"), Lookup::Unknown);
        assert!(cache.is_empty());
    }

    #[test]
    fn unlabelled_secrets_are_never_kept() {
        let cache = SecretCache::default();
        cache.record(&secret("7", true));
        cache.record(&secret("8", false));
        assert!(
            cache.is_empty(),
            "the label was removed: the watch will not follow it"
        );
    }

    #[test]
    fn a_relist_drops_secrets_deleted_while_the_watch_was_down() {
        let cache = SecretCache::default();
        cache.record(&secret("7", true));
        assert!(!cache.is_synced());
        cache.observe(watcher::Event::Init);
        cache.observe(watcher::Event::InitDone);
        assert!(cache.is_synced());
        assert!(cache.is_empty());

        cache.record(&secret("7", true));
        cache.observe(watcher::Event::Init);
        assert!(
            cache
                .observe(watcher::Event::InitApply(meta("7")))
                .is_none()
        );
        cache.observe(watcher::Event::InitDone);
        assert!(matches!(cache.get("team", "sales-url"), Lookup::Known(_)));
    }
}
