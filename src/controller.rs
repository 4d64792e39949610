//! Wires the kube-runtime controller(s): watches, caches, concurrency and shutdown.

use crate::admission::Admission;
use crate::crd::EmbedUrlRequest;
use crate::identity::AwsClients;
use crate::policy::EmbedUrlPolicy;
use crate::providers::Service;
use crate::ratelimit::{RateLimits, required_rate};
use crate::reconciler::{self, Context, FailureCounts, Settings};
use crate::secret::MANAGED_SECRETS_SELECTOR;
use crate::secret_cache::SecretCache;
use crate::telemetry::Metrics;
use futures::{StreamExt, TryStreamExt, future, stream};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::core::{DeserializeGuard, PartialObjectMeta};
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{Controller, WatchStreamExt, controller, watcher};
use kube::{Api, Client, ResourceExt};
use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tracing::{debug, warn};

/// A request as watched and cached: readable or not (see `reconciler::reconcile`).
type CachedRequest = DeserializeGuard<EmbedUrlRequest>;

/// Name that events and the leader lease report the operator under.
pub const CONTROLLER_NAME: &str = "embed-url-operator";

/// What the controllers need besides the Kubernetes client.
#[derive(Clone)]
pub struct ControllerConfig {
    /// Namespaces to watch; empty means all.
    pub namespaces: Vec<String>,
    /// Most reconciles (and AWS calls) in flight at once, across all namespaces.
    pub concurrency: u16,
    pub settings: Settings,
    /// This replica's name, reported in events.
    pub instance: Option<String>,
    /// Client-side AWS rate per (service, region, identity), calls per second; 0 = unlimited.
    pub aws_rate: f64,
    /// Calls allowed at once above that rate.
    pub aws_burst: u32,
}

/// Handle on the running controllers: whether their caches are synced.
#[derive(Clone, Default)]
pub struct Readiness {
    stores: Vec<(Store<DeserializeGuard<EmbedUrlRequest>>, Arc<SecretCache>)>,
}

impl Readiness {
    /// How many readable requests of `service` the caches hold.
    fn count_requests(&self, service: Service) -> usize {
        self.stores
            .iter()
            .map(|(requests, _)| {
                requests
                    .state()
                    .iter()
                    .filter(|r| {
                        r.0.as_ref().is_ok_and(|r| match service {
                            Service::QuickSight => r.spec.quick_sight.is_some(),
                            Service::QBusiness => r.spec.q_business.is_some(),
                            Service::Flink => r.spec.flink.is_some(),
                        })
                    })
                    .count()
            })
            .sum()
    }

    /// Waits until every watch has listed once.
    pub async fn wait_synced(&self) {
        for (requests, secrets) in &self.stores {
            wait_until_ready(|| requests.wait_until_ready()).await;
            while !secrets.is_synced() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        debug!("caches synced");
    }
}

/// Polls a store's readiness again every 100 ms. kube-runtime 5 wakes only the task that polled
/// `Store::wait_until_ready` last (one oneshot receiver shared behind a mutex), and the
/// controller's own runner waits on the same store, so a single long wait here can sleep
/// forever. A store that is ready answers at once, so re-polling costs nothing.
async fn wait_until_ready<F, Fut, E>(ready: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<(), E>>,
{
    loop {
        // An error means the writer was dropped: the controller stopped, nothing to wait for.
        if let Ok(_ready_or_stopped) =
            tokio::time::timeout(Duration::from_millis(100), ready()).await
        {
            return;
        }
    }
}

/// Runs one controller per watched namespace (or one for all) until `shutdown` turns true.
///
/// Returns the readiness handle right away and a future that completes when the controllers
/// have drained after shutdown.
pub fn run(
    client: Client,
    aws: Arc<AwsClients>,
    config: ControllerConfig,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) -> (Readiness, impl Future<Output = ()>) {
    let admission = Arc::new(Admission::new(usize::from(config.concurrency)));
    let rate_limits = Arc::new(RateLimits::new(config.aws_rate, config.aws_burst));
    let failures = Arc::new(FailureCounts::default());
    let reporter = Reporter {
        controller: CONTROLLER_NAME.to_string(),
        instance: config.instance.clone(),
    };
    let scopes: Vec<Option<String>> = if config.namespaces.is_empty() {
        vec![None]
    } else {
        config.namespaces.iter().cloned().map(Some).collect()
    };

    let mut readiness = Readiness::default();
    let mut controllers = Vec::new();
    for namespace in scopes {
        let requests: Api<DeserializeGuard<EmbedUrlRequest>> =
            scoped_api(&client, namespace.as_deref());
        let secrets: Api<PartialObjectMeta<Secret>> = scoped_api(&client, namespace.as_deref());

        // Only the Secrets the operator owns are watched, metadata only, and the cache keeps a
        // small snapshot of each (never the URL): see secret_cache. Memory grows with the
        // operator's own objects only, and the echo of the operator's own Secret writes
        // triggers no reconcile.
        let secret_cache = Arc::new(SecretCache::default());
        // A relist (after 410 Gone, when the watch could not resume) replaces the cache but
        // reports no deletion for a Secret that vanished while the watch was down, so the
        // owner of a Secret deleted in that gap would not be reconciled until its next planned
        // refresh, and its Secret would stay missing that long. After every relist but the
        // first (the initial list of requests reconciles everything anyway), every request is
        // reconciled against the fresh cache; those whose Secret is present do nothing.
        let secrets_relisted = Arc::new(Notify::new());
        let mut first_list = true;
        let relisted = secrets_relisted.clone();
        let observing = secret_cache.clone();
        let secret_events = watcher(
            secrets,
            watcher::Config::default().labels(MANAGED_SECRETS_SELECTOR),
        )
        .default_backoff()
        .inspect_ok(move |event| {
            if let watcher::Event::InitDone = event {
                if !first_list {
                    // Stores one permit at most: relists in a row make one reconcile of all.
                    relisted.notify_one();
                }
                first_list = false;
            }
        })
        .try_filter_map(move |event| future::ready(Ok(observing.observe(event))));
        let reconcile_all_after_relist = stream::unfold(secrets_relisted, |notify| async move {
            notify.notified().await;
            Some(((), notify))
        });

        let (request_store, request_writer) = reflector::store();
        let forget_metrics = metrics.clone();
        let forget_failures = failures.clone();
        let request_events = watcher(requests, watcher::Config::default())
            .default_backoff()
            .modify(trim_request)
            .reflect(request_writer)
            .inspect_ok(move |event| {
                if let watcher::Event::Delete(request) = event {
                    let (namespace, name) =
                        (request.namespace().unwrap_or_default(), request.name_any());
                    forget_metrics.forget_request(&namespace, &name);
                    forget_failures.forget(&namespace, &name);
                }
            })
            // The operator's own status writes come back as events too; reconciling them again
            // would find nothing to do, at the cost of a second reconcile per refresh. Only
            // what a user changes (the spec, the refresh annotation) triggers a reconcile; the
            // schedule's own requeue does the rest.
            .try_filter_map({
                let mut intents = UserIntents::default();
                move |event| future::ready(Ok(intents.trigger(event)))
            });

        // Policies and namespace labels decide what may be minted. Any change to them
        // re-evaluates every request (a live change is rare; the initial listing is one event).
        let (policy_store, policy_writer) = reflector::store();
        let (namespace_store, namespace_writer) = reflector::store();
        let policy_listed = Arc::new(AtomicBool::new(false));
        let namespace_listed = Arc::new(AtomicBool::new(false));
        let policies_synced = Arc::new(AtomicBool::new(false));
        let policy_changes = watcher(
            Api::<EmbedUrlPolicy>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .modify(|p: &mut EmbedUrlPolicy| p.managed_fields_mut().clear())
        .reflect(policy_writer)
        .filter_map(change_trigger(
            "EmbedUrlPolicy",
            policy_listed.clone(),
            namespace_listed.clone(),
            policies_synced.clone(),
        ));
        let namespace_config = match &namespace {
            Some(ns) => watcher::Config::default().fields(&format!("metadata.name={ns}")),
            None => watcher::Config::default(),
        };
        let namespace_changes = watcher(
            Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
            namespace_config,
        )
        .default_backoff()
        .modify(|n| n.managed_fields_mut().clear())
        .reflect(namespace_writer)
        .filter_map(change_trigger(
            "Namespace",
            namespace_listed,
            policy_listed,
            policies_synced.clone(),
        ));

        readiness
            .stores
            .push((request_store.clone(), secret_cache.clone()));
        let context = Arc::new(Context {
            client: client.clone(),
            aws: aws.clone(),
            settings: config.settings.clone(),
            reporter: reporter.clone(),
            secrets: secret_cache,
            policies: policy_store,
            namespaces: namespace_store,
            policies_synced,
            admission: admission.clone(),
            rate_limits: rate_limits.clone(),
            metrics: metrics.clone(),
            failures: failures.clone(),
        });
        let mut stop = shutdown.clone();
        let controller = Controller::for_stream(request_events, request_store)
            .owns_stream(secret_events)
            .reconcile_all_on(stream::select(
                stream::select(policy_changes, namespace_changes),
                reconcile_all_after_relist,
            ))
            // Every due reconcile starts at once and waits for its turn in `admission`, which
            // runs `concurrency` at a time, most urgent first. kube-runtime's own bound would
            // take the waiting ones in hash order, starving some for good under a backlog.
            .with_config(controller::Config::default().concurrency(0))
            .graceful_shutdown_on(async move {
                let _ = stop.wait_for(|stop| *stop).await;
            })
            .run(reconciler::reconcile, reconciler::error_policy, context)
            .for_each(|result| {
                match result {
                    Ok((object, _)) => debug!(object = %object, "reconciled"),
                    Err(error) => warn!(error = %error, "controller error"),
                }
                future::ready(())
            });
        controllers.push(controller);
    }
    let capacity = watch_capacity(readiness.clone(), config.clone(), metrics, shutdown);
    (readiness, async move {
        let capacity = tokio::spawn(capacity);
        future::join_all(controllers).await;
        capacity.abort();
    })
}

/// Every 30 s, compares the AWS call rate the current requests need with the configured rate,
/// exports both, and warns when the configuration cannot keep up (refreshes would queue behind
/// the rate limit and URLs could lapse). The need is `requests / (window - refreshBefore)` per
/// service, with the default refreshBefore (half the window), summed over regions: an upper
/// bound for any one (service, region, identity) bucket.
async fn watch_capacity(
    readiness: Readiness,
    config: ControllerConfig,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    readiness.wait_synced().await;
    let mut warned = std::collections::HashSet::new();
    loop {
        for service in [Service::QuickSight, Service::QBusiness, Service::Flink] {
            let requests = readiness.count_requests(service);
            let window = config.settings.windows.for_service(service);
            let needed = required_rate(requests, window / 2);
            metrics.set_rate_capacity(service, needed, config.aws_rate);
            let short = config.aws_rate > 0.0 && needed > config.aws_rate;
            if short && warned.insert(service) {
                warn!(
                    service = service.name(),
                    requests,
                    needed_calls_per_second = needed,
                    configured_calls_per_second = config.aws_rate,
                    "the AWS rate limit cannot keep up with this many requests: raise --aws-qps or URLs may lapse"
                );
            } else if !short {
                warned.remove(&service);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(30)) => {},
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

/// Drops from a cached request what the operator never reads: managedFields, labels, and
/// annotations other than its own (`kubectl.kubernetes.io/last-applied-configuration` alone can
/// double an object's size).
fn trim_request(request: &mut DeserializeGuard<EmbedUrlRequest>) {
    request.managed_fields_mut().clear();
    request.labels_mut().clear();
    request
        .annotations_mut()
        .retain(|key, _| key.starts_with(OWN_ANNOTATION_PREFIX));
}

const OWN_ANNOTATION_PREFIX: &str = "embedurl.io/";

/// Remembers each request's user intent (see [`user_intent`]) to let only its changes through.
///
/// kube-runtime's `predicate_filter` does the same, but keys its cache by name, namespace and
/// uid as strings (three allocations per request) and forgets entries only after an hour; this
/// keeps two integers per request and forgets a request when it is deleted, or when a relist
/// no longer shows it.
#[derive(Default)]
struct UserIntents {
    by_request: HashMap<u64, u64>,
    /// Requests seen during a relist in progress; the others are forgotten when it ends.
    relisting: Option<HashSet<u64>>,
}

impl UserIntents {
    /// The request to reconcile for this event, if its user intent is new or changed.
    fn trigger(&mut self, event: watcher::Event<CachedRequest>) -> Option<CachedRequest> {
        match event {
            watcher::Event::Apply(request) | watcher::Event::InitApply(request) => {
                let key = request_key(&request);
                if let Some(seen) = &mut self.relisting {
                    seen.insert(key);
                }
                let intent = user_intent(&request);
                let changed = self.by_request.insert(key, intent) != Some(intent);
                changed.then_some(request)
            }
            watcher::Event::Delete(request) => {
                self.by_request.remove(&request_key(&request));
                None
            }
            watcher::Event::Init => {
                self.relisting = Some(HashSet::new());
                None
            }
            watcher::Event::InitDone => {
                if let Some(seen) = self.relisting.take() {
                    self.by_request.retain(|key, _| seen.contains(key));
                }
                None
            }
        }
    }
}

/// The key of a request in [`UserIntents`]: a hash of its uid (of namespace and name if it has
/// none), so that a request deleted and created again under the same name counts as new.
fn request_key(request: &impl ResourceExt) -> u64 {
    let mut hasher = DefaultHasher::new();
    match &request.meta().uid {
        Some(uid) => uid.hash(&mut hasher),
        None => (request.namespace(), request.name_any()).hash(&mut hasher),
    }
    hasher.finish()
}

/// What a reconcile acts on that a user can change: the generation (the spec) and the
/// operator's annotations. A request that does not even deserialize is reconciled on any change,
/// since what is wrong with it may be its status.
fn user_intent(request: &CachedRequest) -> u64 {
    let mut hasher = DefaultHasher::new();
    match &request.0 {
        Ok(request) => {
            request.metadata.generation.hash(&mut hasher);
            request.metadata.annotations.hash(&mut hasher);
        }
        Err(_) => request.resource_version().hash(&mut hasher),
    }
    hasher.finish()
}

/// Turns a policy or namespace watch into "re-evaluate every request" triggers, and marks the
/// policy caches synced once both this watch and its `other` have listed.
fn change_trigger<K>(
    what: &'static str,
    listed: Arc<AtomicBool>,
    other_listed: Arc<AtomicBool>,
    synced: Arc<AtomicBool>,
) -> impl FnMut(Result<watcher::Event<K>, watcher::Error>) -> future::Ready<Option<()>> {
    move |event| {
        future::ready(match event {
            Ok(watcher::Event::InitDone) => {
                listed.store(true, Ordering::Release);
                if other_listed.load(Ordering::Acquire) {
                    synced.store(true, Ordering::Release);
                }
                Some(())
            }
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => Some(()),
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => None,
            Err(error) => {
                warn!(error = %error, "{what} watch failed; requests wait until it recovers");
                None
            }
        })
    }
}

fn scoped_api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::EmbedUrlRequestSpec;
    use kube::core::ObjectMeta;
    use kube::core::error_boundary::InvalidObject;

    fn metadata(uid: &str, generation: i64, resource_version: u32) -> ObjectMeta {
        ObjectMeta {
            name: Some("sales".into()),
            namespace: Some("analytics".into()),
            uid: Some(uid.into()),
            generation: Some(generation),
            resource_version: Some(resource_version.to_string()),
            ..ObjectMeta::default()
        }
    }

    fn request(uid: &str, generation: i64, resource_version: u32) -> CachedRequest {
        let mut request = EmbedUrlRequest::new("sales", EmbedUrlRequestSpec::default());
        request.metadata = metadata(uid, generation, resource_version);
        DeserializeGuard(Ok(request))
    }

    fn unreadable(uid: &str, resource_version: u32) -> CachedRequest {
        DeserializeGuard(Err(InvalidObject {
            error: "invalid type".into(),
            metadata: metadata(uid, 1, resource_version),
        }))
    }

    fn passes(intents: &mut UserIntents, event: watcher::Event<CachedRequest>) -> bool {
        intents.trigger(event).is_some()
    }

    #[test]
    fn only_user_changes_trigger_a_reconcile() {
        let mut intents = UserIntents::default();
        assert!(passes(
            &mut intents,
            watcher::Event::Apply(request("u1", 1, 10))
        ));
        // The operator's own status write: new resourceVersion, same generation.
        assert!(!passes(
            &mut intents,
            watcher::Event::Apply(request("u1", 1, 11))
        ));
        // A spec change.
        assert!(passes(
            &mut intents,
            watcher::Event::Apply(request("u1", 2, 12))
        ));
        // An on-demand refresh.
        let mut annotated = request("u1", 2, 13);
        annotated
            .annotations_mut()
            .insert("embedurl.io/refresh-requested-at".into(), "now".into());
        assert!(passes(&mut intents, watcher::Event::Apply(annotated)));
        // A request that does not deserialize: any change, since its status may be the problem.
        assert!(passes(
            &mut intents,
            watcher::Event::Apply(unreadable("u2", 14))
        ));
        assert!(passes(
            &mut intents,
            watcher::Event::Apply(unreadable("u2", 15))
        ));
        assert!(!passes(
            &mut intents,
            watcher::Event::Apply(unreadable("u2", 15))
        ));
    }

    #[test]
    fn deleted_and_relisted_requests_are_forgotten() {
        let mut intents = UserIntents::default();
        assert!(passes(
            &mut intents,
            watcher::Event::Apply(request("u1", 1, 10))
        ));
        assert!(!passes(
            &mut intents,
            watcher::Event::Delete(request("u1", 1, 11))
        ));
        assert!(intents.by_request.is_empty());
        // Created again under the same name: a new uid, a new request.
        assert!(passes(
            &mut intents,
            watcher::Event::Apply(request("u3", 1, 12))
        ));
        assert!(passes(
            &mut intents,
            watcher::Event::Apply(request("u4", 1, 13))
        ));

        // A relist that no longer shows u3 (deleted while the watch was down) forgets it, and
        // does not trigger u4 again.
        assert!(!passes(&mut intents, watcher::Event::Init));
        assert!(!passes(
            &mut intents,
            watcher::Event::InitApply(request("u4", 1, 13))
        ));
        assert!(!passes(&mut intents, watcher::Event::InitDone));
        assert_eq!(intents.by_request.len(), 1);
        assert!(passes(
            &mut intents,
            watcher::Event::InitApply(request("u3", 1, 20))
        ));
    }
}
