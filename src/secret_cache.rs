//! What the operator knows about the Secrets it owns, without holding their data.
//!
//! The Secret watch is metadata-only and selects the managed-by label, so neither other Secrets
//! nor any URL is ever held in memory. The data facts a reconcile needs (the digest of the URL,
//! its use-by time) are recorded from the operator's own writes and reads, each at the
//! `resourceVersion` it saw. A watch event at the same `resourceVersion` changes nothing (it is
//! the echo of the operator's own write, and triggers no reconcile); one at another
//! `resourceVersion` means someone else changed the Secret, so its data is unknown until the
//! next reconcile reads it again.
//!
//! The watch event of a write can arrive before the write's own response. While the operator
//! writes a Secret, events for it are held back; when the response arrives, an event at the
//! written `resourceVersion` was the echo, and any other means someone else changed the Secret
//! meanwhile, which the writer is told about.

use crate::secret::{SecretSnapshot, is_request_controller};
use crate::work_queue::RequestKey;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
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
    /// Boxed: the map keeps room for more entries than it holds, and a snapshot is a few
    /// hundred bytes.
    entries: HashMap<Key, Box<SecretSnapshot>>,
    /// Keys seen during a (re)list in progress; the others are dropped when it ends.
    relisting: Option<HashSet<Key>>,
    /// Secrets the operator is writing, with the last watch event seen for each meanwhile
    /// (`None`: none yet; `Some(None)`: a deletion).
    writing: HashMap<Key, Option<Option<SecretSnapshot>>>,
}

/// What the cache can say about one Secret.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The Secret as of its latest known `resourceVersion`, data facts included.
    Known(Box<SecretSnapshot>),
    /// Not cached, or changed by someone else since the operator last read it: read it.
    Unknown,
}

impl SecretCache {
    /// Whether the Secret is known, from the watch or a write, to be controlled by the request
    /// with uid `uid` (its data may be unknown).
    pub fn controlled_by(&self, namespace: &str, name: &str, uid: &str) -> bool {
        self.lock()
            .entries
            .get(&key(namespace, name))
            .is_some_and(|snapshot| snapshot.controlled_by(uid))
    }

    pub fn get(&self, namespace: &str, name: &str) -> Lookup {
        let state = self.lock();
        match state.entries.get(&key(namespace, name)) {
            Some(snapshot) if snapshot.data.is_some() => Lookup::Known(snapshot.clone()),
            _ => Lookup::Unknown,
        }
    }

    /// Marks the start of a write of this Secret by the operator: until [`Self::finish_write`],
    /// watch events for it are held back rather than trigger a reconcile.
    pub fn begin_write(&self, namespace: &str, name: &str) {
        self.lock().writing.insert(key(namespace, name), None);
    }

    /// Ends a write: records what was written (`None` if the write failed). Returns true if a
    /// watch event during the write was not the echo of this write (someone else changed or
    /// deleted the Secret meanwhile): its owner should be reconciled again.
    pub fn finish_write(&self, namespace: &str, name: &str, written: Option<&Secret>) -> bool {
        let key = key(namespace, name);
        let mut state = self.lock();
        // An event held during the write that is not this write's own echo.
        let interfered = state.writing.remove(&key).flatten().is_some_and(|event| {
            let event_version = event.as_ref().and_then(|e| e.resource_version.as_deref());
            written
                .is_none_or(|secret| event_version != secret.metadata.resource_version.as_deref())
        });
        if interfered {
            // Someone else's change came during the write, before or after it: which is newer
            // cannot be told from resourceVersions, so the data is unknown until read again.
            state.entries.remove(&key);
        } else if let Some(secret) = written {
            state.record(key, secret);
        }
        interfered
    }

    /// Records a Secret the operator has just written or read in full. Secrets without the
    /// managed-by label are not recorded: the watch would never tell of their changes.
    pub fn record(&self, secret: &Secret) {
        let key = key(
            secret.metadata.namespace.as_deref().unwrap_or_default(),
            secret.metadata.name.as_deref().unwrap_or_default(),
        );
        self.lock().record(key, secret);
    }

    /// Whether the first listing has completed.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.lock().entries.is_empty()
    }

    /// Applies one event of the metadata-only watch. Returns the requests to reconcile: the
    /// owner of a Secret that appeared, changed under someone else's hand, or went away.
    pub fn observe(&self, event: watcher::Event<PartialObjectMeta<Secret>>) -> Vec<RequestKey> {
        let mut state = self.lock();
        match event {
            watcher::Event::Apply(meta) => state.apply(meta),
            watcher::Event::Delete(meta) => {
                let key = meta_key(&meta);
                if let Some(held) = state.writing.get_mut(&key) {
                    *held = Some(None);
                    return Vec::new();
                }
                state.entries.remove(&key);
                owner_of(&meta).into_iter().collect()
            }
            watcher::Event::Init => {
                state.relisting = Some(HashSet::new());
                Vec::new()
            }
            watcher::Event::InitApply(meta) => {
                if let Some(seen) = state.relisting.as_mut() {
                    seen.insert(meta_key(&meta));
                }
                state.apply(meta)
            }
            watcher::Event::InitDone => {
                self.synced.store(true, Ordering::Release);
                // A relist reports no deletion for a Secret that went away (or lost the label)
                // while the watch was down: those are the known ones it did not show. Their
                // owners are reconciled; the Secrets it showed unchanged need nothing. On the
                // first listing too: a Secret a reconcile read before it and that was deleted
                // before it was taken. (One the operator wrote after the listing was taken is
                // reported as well; its owner's reconcile reads it, finds it current, and stops.)
                let Some(seen) = state.relisting.take() else {
                    return Vec::new();
                };
                let mut vanished = Vec::new();
                state.entries.retain(|key, snapshot| {
                    let kept = seen.contains(key);
                    if !kept && let Some(owner) = snapshot.controlling_request() {
                        vanished.push(RequestKey::new(&key.0, owner));
                    }
                    kept
                });
                vanished
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
    /// Keeps what the operator owns: labelled and controlled by an EmbedUrlRequest. A Secret
    /// someone else labelled is not kept (a reconcile that needs it reads its metadata).
    fn record(&mut self, key: Key, secret: &Secret) {
        let snapshot = SecretSnapshot::of(secret);
        if snapshot.is_labelled() && snapshot.controlling_request().is_some() {
            self.entries.insert(key, Box::new(snapshot));
        } else {
            self.entries.remove(&key);
        }
    }

    /// Records a Secret as the watch shows it; returns the requests to reconcile.
    fn apply(&mut self, meta: PartialObjectMeta<Secret>) -> Vec<RequestKey> {
        let key = meta_key(&meta);
        if let Some(held) = self.writing.get_mut(&key) {
            // Decided when the write's response arrives (finish_write).
            *held = Some(Some(SecretSnapshot::of_metadata(&meta.metadata, None)));
            return Vec::new();
        }
        let version = meta.metadata.resource_version.as_deref();
        let known = self.entries.get(&key);
        if known.is_some_and(|known| known.resource_version.as_deref() == version) {
            // Already known at this version: the echo of the operator's own write, or a relist.
            return Vec::new();
        }
        // The request that controls it now, and the one that did before if another: a Secret
        // re-created or re-owned by someone else (during a watch gap, or live) leaves its
        // former owner without a Secret.
        let mut owners: Vec<RequestKey> = owner_of(&meta).into_iter().collect();
        if let Some(former) = known.and_then(|known| known.controlling_request()) {
            let former = RequestKey::new(&key.0, former);
            if !owners.contains(&former) {
                owners.push(former);
            }
        }
        let snapshot = SecretSnapshot::of_metadata(&meta.metadata, None);
        if snapshot.controlling_request().is_some() {
            self.entries.insert(key, Box::new(snapshot));
        } else {
            // Labelled, but no request controls it: not the operator's, not kept.
            self.entries.remove(&key);
        }
        owners
    }
}

/// The request that controls this Secret, if one does.
fn owner_of(secret: &PartialObjectMeta<Secret>) -> Option<RequestKey> {
    let owner = secret
        .owner_references()
        .iter()
        .find(|owner| is_request_controller(owner))?;
    Some(RequestKey::new(&secret.namespace()?, &owner.name))
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
                    api_version: "embedurl.io/v1alpha1".into(),
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

    /// The request that controls the Secret of these tests.
    fn owner() -> RequestKey {
        RequestKey::new("team", "sales")
    }

    fn meta(version: &str) -> PartialObjectMeta<Secret> {
        PartialObjectMeta {
            metadata: secret(version, true).metadata,
            ..Default::default()
        }
    }

    #[test]
    fn a_labelled_secret_no_request_controls_is_not_kept() {
        let cache = SecretCache::default();
        let mut copied = secret("5", true);
        copied.metadata.owner_references = None;
        cache.record(&copied);
        assert_eq!(cache.get("team", "sales-url"), Lookup::Unknown);
        assert!(cache.lock().entries.is_empty());
        // Nor from the watch.
        let meta = PartialObjectMeta::<Secret> {
            metadata: copied.metadata.clone(),
            ..Default::default()
        };
        cache.lock().apply(meta);
        assert!(cache.lock().entries.is_empty());
        // Its own Secrets are.
        cache.record(&secret("6", true));
        assert!(cache.controlled_by("team", "sales-url", "uid-1"));
        assert!(!cache.controlled_by("team", "sales-url", "uid-2"));
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
        assert!(cache.observe(watcher::Event::Apply(meta("7"))).is_empty());
        assert!(matches!(cache.get("team", "sales-url"), Lookup::Known(_)));
    }

    #[test]
    fn someone_elses_change_makes_the_data_unknown_and_triggers() {
        let cache = SecretCache::default();
        cache.record(&secret("7", true));
        assert!(cache.observe(watcher::Event::Apply(meta("8"))) == [owner()]);
        assert_eq!(cache.get("team", "sales-url"), Lookup::Unknown);
        // Reading it again makes it known.
        cache.record(&secret("8", true));
        assert!(matches!(cache.get("team", "sales-url"), Lookup::Known(_)));
        assert!(cache.observe(watcher::Event::Delete(meta("8"))) == [owner()]);
        assert_eq!(cache.get("team", "sales-url"), Lookup::Unknown);
        assert!(cache.is_empty());
    }

    #[test]
    fn an_echo_that_beats_the_write_response_triggers_nothing() {
        let cache = SecretCache::default();
        cache.begin_write("team", "sales-url");
        assert!(cache.observe(watcher::Event::Apply(meta("9"))).is_empty());
        assert!(!cache.finish_write("team", "sales-url", Some(&secret("9", true))));
        assert!(matches!(cache.get("team", "sales-url"), Lookup::Known(_)));
        // Later events are handled as usual again.
        assert!(cache.observe(watcher::Event::Apply(meta("10"))) == [owner()]);
    }

    #[test]
    fn a_change_by_someone_else_during_a_write_is_reported() {
        let cache = SecretCache::default();
        cache.begin_write("team", "sales-url");
        assert!(cache.observe(watcher::Event::Apply(meta("8"))).is_empty());
        assert!(cache.finish_write("team", "sales-url", Some(&secret("9", true))));
        assert_eq!(
            cache.get("team", "sales-url"),
            Lookup::Unknown,
            "which of the two is newer is unknown: read it again"
        );
        // Someone else's change right after the write, arriving before its response.
        cache.begin_write("team", "sales-url");
        assert!(cache.observe(watcher::Event::Apply(meta("11"))).is_empty());
        assert!(cache.finish_write("team", "sales-url", Some(&secret("10", true))));
        assert_eq!(cache.get("team", "sales-url"), Lookup::Unknown);
        // The write failed and someone deleted the Secret meanwhile.
        cache.begin_write("team", "sales-url");
        assert!(cache.observe(watcher::Event::Delete(meta("9"))).is_empty());
        assert!(cache.finish_write("team", "sales-url", None));
        assert_eq!(cache.get("team", "sales-url"), Lookup::Unknown);
        // A failed write with no event meanwhile changes nothing.
        cache.record(&secret("10", true));
        cache.begin_write("team", "sales-url");
        assert!(!cache.finish_write("team", "sales-url", None));
        assert!(matches!(cache.get("team", "sales-url"), Lookup::Known(_)));
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
    fn a_relist_drops_secrets_deleted_while_the_watch_was_down_and_names_their_owners() {
        let cache = SecretCache::default();
        // Written by the operator before the first listing, deleted before it was taken.
        cache.record(&secret("7", true));
        assert!(!cache.is_synced());
        assert!(cache.observe(watcher::Event::Init).is_empty());
        assert_eq!(cache.observe(watcher::Event::InitDone), [owner()]);
        assert!(cache.is_synced());
        assert!(cache.is_empty());

        // A relist that shows the Secret as known: nothing to reconcile, the snapshot stays.
        cache.record(&secret("7", true));
        cache.observe(watcher::Event::Init);
        assert!(
            cache
                .observe(watcher::Event::InitApply(meta("7")))
                .is_empty()
        );
        assert!(cache.observe(watcher::Event::InitDone).is_empty());
        assert!(matches!(cache.get("team", "sales-url"), Lookup::Known(_)));

        // A relist that shows it changed: its owner, once.
        cache.observe(watcher::Event::Init);
        assert_eq!(
            cache.observe(watcher::Event::InitApply(meta("9"))),
            [owner()]
        );
        assert!(cache.observe(watcher::Event::InitDone).is_empty());

        // A relist that no longer shows it: its owner.
        cache.observe(watcher::Event::Init);
        assert_eq!(cache.observe(watcher::Event::InitDone), [owner()]);
        assert!(cache.is_empty());
    }

    #[test]
    fn a_secret_taken_over_by_another_request_names_both_owners() {
        let cache = SecretCache::default();
        cache.record(&secret("7", true));
        let mut taken = meta("8");
        if let Some(owners) = taken.metadata.owner_references.as_mut() {
            owners[0].name = "marketing".into();
            owners[0].uid = "uid-2".into();
        }
        assert_eq!(
            cache.observe(watcher::Event::Apply(taken)),
            [RequestKey::new("team", "marketing"), owner()]
        );
    }

    #[test]
    fn a_secret_controlled_by_something_else_is_neither_kept_nor_named_as_owner() {
        for (api_version, kind) in [
            ("embedurl.io/v1alpha1", "ConfigMap"),
            ("other.example/v1alpha1", "EmbedUrlRequest"),
        ] {
            let cache = SecretCache::default();
            let mut foreign = secret("7", true);
            if let Some(owners) = foreign.metadata.owner_references.as_mut() {
                owners[0].api_version = api_version.into();
                owners[0].kind = kind.into();
            }
            cache.record(&foreign);
            assert!(cache.is_empty(), "{api_version} {kind}");
            // Nor through the watch: seen, then gone in a relist, it names no request.
            let mut seen = meta("7");
            if let Some(owners) = seen.metadata.owner_references.as_mut() {
                owners[0].api_version = api_version.into();
                owners[0].kind = kind.into();
            }
            assert!(cache.observe(watcher::Event::Apply(seen)).is_empty());
            assert!(cache.is_empty(), "{api_version} {kind}");
            cache.observe(watcher::Event::Init);
            assert!(cache.observe(watcher::Event::InitDone).is_empty());
        }
    }

    #[test]
    fn a_secret_belongs_to_the_request_that_controls_it() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
        let owner = |kind: &str, controller: bool| OwnerReference {
            api_version: "embedurl.io/v1alpha1".into(),
            kind: kind.into(),
            name: "sales".into(),
            uid: "u1".into(),
            controller: Some(controller),
            ..OwnerReference::default()
        };
        let secret = |owners: Vec<OwnerReference>| PartialObjectMeta::<Secret> {
            metadata: ObjectMeta {
                name: Some("sales-url".into()),
                namespace: Some("analytics".into()),
                owner_references: Some(owners),
                ..ObjectMeta::default()
            },
            ..PartialObjectMeta::default()
        };
        assert_eq!(
            owner_of(&secret(vec![owner("EmbedUrlRequest", true)])),
            Some(RequestKey::new("analytics", "sales"))
        );
        assert_eq!(
            owner_of(&secret(vec![owner("EmbedUrlRequest", false)])),
            None
        );
        assert_eq!(owner_of(&secret(vec![owner("ConfigMap", true)])), None);
        assert_eq!(owner_of(&secret(vec![])), None);
        // Another version of the API names the same request; another group does not.
        let in_version = |api_version: &str| {
            let mut reference = owner("EmbedUrlRequest", true);
            reference.api_version = api_version.into();
            owner_of(&secret(vec![reference]))
        };
        assert_eq!(
            in_version("embedurl.io/v1"),
            Some(RequestKey::new("analytics", "sales"))
        );
        assert_eq!(in_version("other.example/v1alpha1"), None);
        assert_eq!(in_version("embedurl.io"), None);
    }
}
