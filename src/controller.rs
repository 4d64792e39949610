//! Wires the controller: the watches and caches (kube-runtime's), the work queue that runs the
//! reconciles, concurrency and shutdown.

use crate::crd::{CachedRequest, EmbedUrlRequest, OWN_ANNOTATION_PREFIX};
use crate::events::Reporter;
use crate::identity::AwsClients;
use crate::lean::{self, Lean};
use crate::policy::EmbedUrlPolicy;
use crate::providers::Service;
use crate::ratelimit::{Demand, RateLimits, Refreshing};
use crate::reconciler::{self, Context, FailureCounts, Settings};
use crate::secret::MANAGED_SECRETS_SELECTOR;
use crate::secret_cache::SecretCache;
use crate::status::reasons;
use crate::telemetry::Metrics;
use crate::validation;
use crate::work_queue::{Liveness, RequestKey, Urgency, WorkQueue};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt, future};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, warn};

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
    /// Told of the work queue, for `/healthz`.
    pub liveness: Liveness,
}

/// Handle on the running controllers: whether their caches are synced.
#[derive(Clone, Default)]
pub struct Readiness {
    stores: Vec<(Store<CachedRequest>, Arc<SecretCache>)>,
    /// Set once the policy watch and each scope's namespace watch have listed: until then
    /// requests wait rather than be judged without the policies.
    listed: Vec<Arc<AtomicBool>>,
    /// The policies, for the region and the role a policy gives the requests it serves.
    policies: Option<Store<EmbedUrlPolicy>>,
}

impl Readiness {
    /// What the readable requests the caches hold ask of the AWS rate limit: those the operator
    /// refreshes (not suspended, and not halted as not permitted, in conflict or invalid).
    fn demand(&self, settings: &Settings) -> Demand {
        let mut demand = Demand::default();
        for (requests, _) in &self.stores {
            for request in requests.state() {
                let Ok(request) = request.0.as_ref() else {
                    continue;
                };
                let spec = &request.spec;
                let service = match (&spec.quick_sight, &spec.q_business, &spec.flink) {
                    (Some(_), None, None) => Service::QuickSight,
                    (None, Some(_), None) => Service::QBusiness,
                    (None, None, Some(_)) => Service::Flink,
                    _ => continue,
                };
                let halted = request
                    .status
                    .as_ref()
                    .and_then(|status| status.ready())
                    .is_some_and(|ready| reasons::HALTED.contains(&ready.reason.as_str()));
                if spec.suspend == Some(true) || halted {
                    continue;
                }
                let window = settings.windows.for_service(service);
                let refresh_before = match spec.refresh_before.as_deref() {
                    None => window / 2,
                    Some(text) => match validation::parse_duration(text) {
                        Some(parsed) => parsed,
                        None => continue,
                    },
                };
                // As the reconcile resolves them: the region is the request's, the serving
                // policy's or the operator's; the identity the policy's role, or the operator's.
                let policy = self.serving_policy(request);
                let policy_aws = policy.as_ref().and_then(|p| p.spec.aws.as_ref());
                let region = spec
                    .region
                    .as_deref()
                    .or(policy_aws.and_then(|aws| aws.region.as_deref()))
                    .or(settings.default_region.as_deref())
                    .unwrap_or_default();
                let identity = policy_aws
                    .and_then(|aws| aws.role_arn.as_deref())
                    .unwrap_or_default();
                demand.add(&Refreshing {
                    service,
                    region,
                    identity,
                    refresh_before,
                    window,
                });
            }
        }
        demand
    }

    /// The policy that last served `request` (its `status.policy`).
    fn serving_policy(&self, request: &EmbedUrlRequest) -> Option<Arc<EmbedUrlPolicy>> {
        let name = request.status.as_ref()?.policy.as_deref()?;
        self.policies.as_ref()?.get(&ObjectRef::new(name))
    }

    /// Waits until every watch has listed once.
    pub async fn wait_synced(&self) {
        for (requests, secrets) in &self.stores {
            wait_until_ready(|| requests.wait_until_ready()).await;
            while !secrets.is_synced() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        for listed in &self.listed {
            while !listed.load(Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        debug!("caches synced");
    }
}

/// Polls a store's readiness again every 100 ms. kube-runtime 5 wakes only the task that polled
/// `Store::wait_until_ready` last (one oneshot receiver shared behind a mutex), and another
/// waiter on the same store (a second readiness check) would leave a single long wait here
/// asleep forever. A store that is ready answers at once, so re-polling costs nothing.
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

/// Runs the watches and caches of each watched namespace (or of all), and the reconciles the one
/// work queue hands out, until `shutdown` turns true.
///
/// Returns the readiness handle right away and a future that completes when the reconciles in
/// flight have drained after shutdown.
pub fn run(
    client: Client,
    aws: Arc<AwsClients>,
    config: ControllerConfig,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) -> (Readiness, impl Future<Output = ()>) {
    // A rate-limit line per bucket as long as the slots, and lines for 16 busy buckets at once:
    // each waiter is a suspended reconcile, without a slot (see `ratelimit`).
    let slots = usize::from(config.concurrency.max(1));
    let rate_limits =
        Arc::new(RateLimits::new(config.aws_rate, config.aws_burst).with_lines(slots, 16 * slots));
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
    let caches: Vec<_> = scopes
        .into_iter()
        .map(|scope| {
            let (store, writer) = reflector::store();
            (scope, store, writer)
        })
        .collect();
    // One queue for every watched namespace: `--concurrency` bounds the process.
    let queue = Arc::new(WorkQueue::new(
        usize::from(config.concurrency),
        urgency_from(
            caches
                .iter()
                .map(|(scope, store, _)| (scope.clone(), store.clone()))
                .collect(),
        ),
    ));
    config.liveness.watch(&queue);

    // Policies decide what may be minted, in every scope: one watch and one cache for all of
    // them (policies are cluster-scoped). Any change re-evaluates every request.
    let (policy_store, policy_writer) = reflector::store();
    let policies_listed = Arc::new(AtomicBool::new(false));
    let every_scope: Vec<Store<CachedRequest>> =
        caches.iter().map(|(_, store, _)| store.clone()).collect();
    let everything = queue.clone();
    let policy_changes = watcher(
        Api::<EmbedUrlPolicy>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(|p: &mut EmbedUrlPolicy| p.managed_fields_mut().clear())
    .reflect(policy_writer)
    .filter_map(change_trigger(
        "EmbedUrlPolicy",
        policy_store.clone(),
        policies_listed.clone(),
    ))
    .for_each(move |()| {
        reconcile_every_request(&every_scope, &everything);
        future::ready(())
    });

    let mut readiness = Readiness {
        listed: vec![policies_listed.clone()],
        policies: Some(policy_store.clone()),
        ..Readiness::default()
    };
    let mut watches = vec![policy_changes.boxed()];
    let mut routes = Vec::new();
    for (namespace, request_store, request_writer) in caches {
        let requests: Api<CachedRequest> = scoped_api(&client, namespace.as_deref());
        let secrets: Api<Lean<PartialObjectMeta<Secret>>> =
            scoped_api(&client, namespace.as_deref());

        // Only the Secrets the operator owns are watched, metadata only, and the cache keeps a
        // small snapshot of each (never the URL): see secret_cache. Memory grows with the
        // operator's own objects only, and the echo of the operator's own Secret writes
        // triggers no reconcile.
        let secret_cache = Arc::new(SecretCache::default());
        let observing = secret_cache.clone();
        let owners = queue.clone();
        let secret_changes = watcher(
            secrets,
            watcher::Config::default().labels(MANAGED_SECRETS_SELECTOR),
        )
        .default_backoff()
        .for_each(move |event| {
            match event {
                // A change by someone else, or a Secret a relist no longer shows: reconcile the
                // request that owns it.
                Ok(event) => {
                    for owner in observing.observe(lean::unwrap_event(event)) {
                        owners.schedule_now(&owner);
                    }
                }
                Err(error) => warn!(error = %error, "Secret watch failed; retrying"),
            }
            future::ready(())
        });

        let forget_metrics = metrics.clone();
        let forget_failures = failures.clone();
        let relisted = request_store.clone();
        let relisted_scope = namespace.clone();
        let requests_changed = queue.clone();
        let mut intents = UserIntents::default();
        let request_events = watcher(requests, watcher::Config::default())
            .default_backoff()
            .modify(trim_request)
            .reflect(request_writer)
            .for_each(move |event| {
                match event {
                    Ok(event) => {
                        if let watcher::Event::Delete(request) = &event {
                            let key = RequestKey::of(request);
                            // The queue first: a reconcile in flight that then finds the
                            // request forgotten cleans up what it recorded after this
                            // (`Running::forgotten`).
                            requests_changed.forget(&key);
                            forget_metrics.forget_request(&key.namespace, &key.name);
                            forget_failures.forget(&key.namespace, &key.name);
                        }
                        if let watcher::Event::InitDone = &event {
                            // A relist: requests deleted while the watch was down were never
                            // reported deleted. The cache now holds what the list showed.
                            let in_scope = |ns: &str| covers(&relisted_scope, ns);
                            let exists = |ns: &str, name: &str| {
                                relisted.get(&ObjectRef::new(name).within(ns)).is_some()
                            };
                            forget_metrics.retain_requests(in_scope, exists);
                            forget_failures.retain(in_scope, exists);
                        }
                        // The operator's own status writes come back as events too;
                        // reconciling them again would find nothing to do, at the cost of a
                        // second reconcile per refresh. Only what a user changes (the spec, the
                        // refresh annotation) is reconciled; the queue's schedule does the rest.
                        for key in intents.triggers(event) {
                            requests_changed.schedule_now(&key);
                        }
                    }
                    Err(error) => warn!(error = %error, "EmbedUrlRequest watch failed; retrying"),
                }
                future::ready(())
            });

        // Namespace labels decide which policies select a request. Any change to them
        // re-evaluates every request of this scope (a live change is rare; the initial listing
        // is one event; a relist that finds what was known is none).
        let (namespace_store, namespace_writer) = reflector::store();
        let namespaces_listed = Arc::new(AtomicBool::new(false));
        let namespace_config = match &namespace {
            Some(ns) => watcher::Config::default().fields(&format!("metadata.name={ns}")),
            None => watcher::Config::default(),
        };
        let scope_requests = request_store.clone();
        let everything = queue.clone();
        let namespace_changes = watcher(
            Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
            namespace_config,
        )
        .default_backoff()
        .modify(|n| n.managed_fields_mut().clear())
        .reflect(namespace_writer)
        .filter_map(change_trigger(
            "Namespace",
            namespace_store.clone(),
            namespaces_listed.clone(),
        ))
        .for_each(move |()| {
            reconcile_every_request(std::slice::from_ref(&scope_requests), &everything);
            future::ready(())
        });

        readiness
            .stores
            .push((request_store.clone(), secret_cache.clone()));
        readiness.listed.push(namespaces_listed.clone());
        let context = Arc::new(Context {
            client: client.clone(),
            aws: aws.clone(),
            settings: config.settings.clone(),
            reporter: reporter.clone(),
            secrets: secret_cache,
            requests: request_store.clone(),
            policies: policy_store.clone(),
            namespaces: namespace_store,
            policies_listed: policies_listed.clone(),
            namespaces_listed,
            queue: queue.clone(),
            rate_limits: rate_limits.clone(),
            metrics: metrics.clone(),
            failures: failures.clone(),
        });
        // The watches only feed the queue and the caches; each is a task of its own, woken
        // only by its own connection (polled together with the reconciles, every answer to any
        // of them would poll every watch's stream as well).
        watches.extend([
            request_events.boxed(),
            secret_changes.boxed(),
            namespace_changes.boxed(),
        ]);
        routes.push((namespace, request_store, context));
    }
    let capacity = watch_capacity(
        readiness.clone(),
        config.clone(),
        metrics.clone(),
        shutdown.clone(),
    );
    let dispatcher = dispatch(queue, routes, metrics.clone(), shutdown);
    (readiness, async move {
        // Guarded: when this future is dropped rather than run to its end (a leader that lost
        // its Lease aborts it), its helpers and the reconciles in flight stop with it.
        let _capacity = AbortOnDrop(tokio::spawn(capacity));
        supervise(dispatcher, watches).await;
    })
}

/// Runs `dispatcher` until it ends, and each watch as a task of its own meanwhile. Dropped
/// before that, it aborts the watches.
async fn supervise(dispatcher: impl Future<Output = ()>, watches: Vec<BoxFuture<'static, ()>>) {
    let mut watches: Vec<AbortOnDrop> = watches
        .into_iter()
        .map(|watch| AbortOnDrop(tokio::spawn(watch)))
        .collect();
    tokio::select! {
        () = dispatcher => {}
        // The watches only end by panicking. Without one, requests are judged against
        // caches that no longer change and their changes are missed: stop the process
        // (Kubernetes restarts it) rather than stay Ready.
        (ended, _, _) = future::select_all(watches.iter_mut().map(|watch| &mut watch.0)) => {
            reraise_panic(ended);
        }
    }
}

/// A spawned task that is aborted when this handle is dropped (a plain `JoinHandle` detaches).
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Waits for the controllers (a task already told to stop) to finish their in-flight
/// reconciles, for at most `limit`, then drops what is left. A reconcile can wait on AWS for up
/// to 30 s, and the kubelet kills the pod at `terminationGracePeriodSeconds`: stopping first
/// lets the process exit cleanly. (A leader drains in `leader::run_while_leading`, which renews
/// its Lease meanwhile and then releases it.) A reconcile dropped between its AWS call and its
/// Secret write loses only that URL; the Secret keeps the previous one. Re-raises a panic of the
/// controllers.
pub async fn drain(mut controllers: tokio::task::JoinHandle<()>, limit: Duration) {
    let ended = match tokio::time::timeout(limit, &mut controllers).await {
        Ok(ended) => ended,
        Err(_) => {
            warn!(
                limit_secs = limit.as_secs_f64(),
                "in-flight reconciles did not finish in time; dropped them"
            );
            controllers.abort();
            controllers.await
        }
    };
    reraise_panic(ended);
}

/// If a task that ended did so by panicking, the panic goes on, out of this task, so that the
/// process stops (and Kubernetes restarts it) instead of running on without the part that died.
pub fn reraise_panic<T>(ended: Result<T, tokio::task::JoinError>) {
    if let Err(error) = ended
        && error.is_panic()
    {
        std::panic::resume_unwind(error.into_panic());
    }
}

/// Where the queue's requests go: per watched scope, its cache and its reconciles' context.
type Route = (Option<String>, Store<CachedRequest>, Arc<Context>);

/// Runs what the queue says is next, each reconcile a task of its own (the queue bounds how
/// many: its slots, and the rate-limit lines' places), until `shutdown` turns true; then waits
/// for those in flight to finish. Dropped instead, it aborts them.
async fn dispatch(
    queue: Arc<WorkQueue>,
    routes: Vec<Route>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut reconciles = JoinSet::new();
    loop {
        let running = tokio::select! {
            // In this order: nothing new starts once asked to stop, and finished reconciles are
            // reaped (a panic re-raised) before more start.
            biased;
            _ = shutdown.wait_for(|stop| *stop) => break,
            Some(ended) = reconciles.join_next() => {
                reraise_panic(ended);
                continue;
            }
            running = queue.next(|due| metrics.set_reconciles_due(due)) => running,
        };
        let key = running.key();
        let route = routes
            .iter()
            .find(|(scope, _, _)| covers(scope, &key.namespace));
        let cached = route.and_then(|(_, cache, context)| {
            let reference = ObjectRef::new(&key.name).within(&key.namespace);
            Some((cache.get(&reference)?, context.clone()))
        });
        // A request no longer cached (deleted, the deletion perhaps missed during a watch gap)
        // is not reconciled; dropping `running` frees its slot.
        if let Some((request, context)) = cached {
            // Boxed: a reconcile's future is several KiB (every await point's state), and a
            // task moves its future by value as it is spawned, finishes and is reaped.
            reconciles.spawn(Box::pin(reconciler::reconcile(request, context, running)));
        }
    }
    debug!(
        in_flight = reconciles.len(),
        "stopped starting reconciles; draining"
    );
    while let Some(ended) = reconciles.join_next().await {
        reraise_panic(ended);
    }
}

/// The urgency of a request (see [`reconciler::urgency`]) as its cache holds it; now for one
/// not cached (yet, or any more).
fn urgency_from(stores: Vec<(Option<String>, Store<CachedRequest>)>) -> Urgency {
    Box::new(move |key| {
        stores
            .iter()
            .find(|(scope, _)| covers(scope, &key.namespace))
            .and_then(|(_, store)| store.get(&ObjectRef::new(&key.name).within(&key.namespace)))
            .map_or_else(Timestamp::now, |request| reconciler::urgency(&request))
            .as_millisecond()
    })
}

/// Whether a controller watching `scope` (`None`: every namespace) serves `namespace`.
fn covers(scope: &Option<String>, namespace: &str) -> bool {
    scope.as_deref().is_none_or(|ns| ns == namespace)
}

/// Every 30 s, compares the AWS call rate the current requests need with the configured rate,
/// exports both, and warns when the configuration cannot keep up (refreshes would queue behind
/// the rate limit and URLs could lapse). The need is each request's `1 / (window - 1.1 x
/// refreshBefore)`, summed per rate-limit bucket (service, region, identity), and the busiest
/// bucket of each service counts: the limit applies to each bucket alone.
async fn watch_capacity(
    readiness: Readiness,
    config: ControllerConfig,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    readiness.wait_synced().await;
    let mut warned = std::collections::HashSet::new();
    loop {
        let demand = readiness.demand(&config.settings);
        for service in [Service::QuickSight, Service::QBusiness, Service::Flink] {
            let (needed, bucket) = demand.busiest(service);
            metrics.set_rate_capacity(service, needed, config.aws_rate);
            let short = config.aws_rate > 0.0 && needed > config.aws_rate;
            if short && warned.insert(service) {
                let (region, identity) = bucket.unwrap_or_default();
                warn!(
                    service = service.name(),
                    region,
                    // A role ARN names no secret.
                    identity = if identity.is_empty() {
                        "the operator's own"
                    } else {
                        identity
                    },
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
fn trim_request(request: &mut CachedRequest) {
    request.managed_fields_mut().clear();
    request.labels_mut().clear();
    request
        .annotations_mut()
        .retain(|key, _| key.starts_with(OWN_ANNOTATION_PREFIX));
}

/// Remembers each request's user intent (see [`user_intent`]) to let only its changes through.
///
/// kube-runtime's `predicate_filter` does the same, but keys its cache by name, namespace and
/// uid as strings (three allocations per request) and forgets entries only after an hour; this
/// keeps two integers per request and forgets a request when it is deleted, or when a relist
/// no longer shows it.
#[derive(Default)]
struct UserIntents {
    by_request: HashMap<u64, u64>,
    /// During a (re)list: the requests seen, and those to reconcile. The request cache shows a
    /// list's objects only once it is complete, so they are reconciled then.
    relisting: Option<(HashSet<u64>, Vec<RequestKey>)>,
}

impl UserIntents {
    /// The requests to reconcile after this event: those whose user intent is new or changed.
    fn triggers(&mut self, event: watcher::Event<CachedRequest>) -> Vec<RequestKey> {
        match event {
            watcher::Event::Apply(request) | watcher::Event::InitApply(request) => {
                let id = uid_hash(&request);
                let intent = user_intent(&request);
                let changed = self.by_request.insert(id, intent) != Some(intent);
                let trigger = changed.then(|| RequestKey::of(&request));
                match &mut self.relisting {
                    Some((seen, held)) => {
                        seen.insert(id);
                        held.extend(trigger);
                        Vec::new()
                    }
                    None => trigger.into_iter().collect(),
                }
            }
            watcher::Event::Delete(request) => {
                self.by_request.remove(&uid_hash(&request));
                Vec::new()
            }
            watcher::Event::Init => {
                // A list can start over (a page failed): what it already triggered is kept, or
                // those requests, recorded as seen, would not be triggered again.
                let held = self.relisting.take().map(|(_, held)| held);
                self.relisting = Some((HashSet::new(), held.unwrap_or_default()));
                Vec::new()
            }
            watcher::Event::InitDone => match self.relisting.take() {
                Some((seen, held)) => {
                    self.by_request.retain(|id, _| seen.contains(id));
                    held
                }
                None => Vec::new(),
            },
        }
    }
}

/// A request's identity in [`UserIntents`]: a hash of its uid (of namespace and name if it has
/// none), so that a request deleted and created again under the same name counts as new.
fn uid_hash(request: &CachedRequest) -> u64 {
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

/// Turns the events of a watch whose objects decide what may be minted (policies, namespaces)
/// into "re-evaluate every request" triggers: on every change, and after a (re)list only if what
/// it found differs from what was known. Sets `listed` once it has listed. A watch of a kind
/// that rarely changes falls behind the
/// API server's history and relists on its next restart (a 410 after compaction, when no
/// bookmark kept its resourceVersion fresh); reconciling every request for that would queue
/// 10,000 reconciles that find nothing to do ahead of the refreshes that are due.
fn change_trigger<K>(
    what: &'static str,
    store: Store<K>,
    listed: Arc<AtomicBool>,
) -> impl FnMut(Result<watcher::Event<K>, watcher::Error>) -> future::Ready<Option<()>>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    // What the store held when a trigger was last decided; `None` before the first listing.
    let mut known: Option<u64> = None;
    move |event| {
        future::ready(match event {
            Ok(watcher::Event::InitDone) => {
                listed.store(true, Ordering::Release);
                let found = fingerprint(&store.state());
                (known.replace(found) != Some(found)).then_some(())
            }
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
                known = Some(fingerprint(&store.state()));
                Some(())
            }
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => None,
            Err(error) => {
                warn!(error = %error, "{what} watch failed; retrying (until its first listing, requests wait; after it, the cached objects stay in use)");
                None
            }
        })
    }
}

/// Queues a reconcile of every request the `stores` hold (the decision of what may be minted
/// changed).
fn reconcile_every_request(stores: &[Store<CachedRequest>], queue: &WorkQueue) {
    for store in stores {
        for request in store.state() {
            queue.schedule_now(&RequestKey::of(&*request));
        }
    }
}

/// Identifies a set of objects by their names and resourceVersions (any change to an object
/// changes its resourceVersion), whatever order the store lists them in.
fn fingerprint<K: Resource>(objects: &[Arc<K>]) -> u64 {
    let mut sum = objects.len() as u64;
    for object in objects {
        let meta = object.meta();
        let mut hasher = DefaultHasher::new();
        (&meta.namespace, &meta.name, &meta.resource_version).hash(&mut hasher);
        sum = sum.wrapping_add(hasher.finish());
    }
    sum
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
    use crate::guard::Guarded;
    use kube::core::ObjectMeta;
    use kube::core::error_boundary::InvalidObject;
    use watcher::Event::{Apply, Delete, Init, InitApply, InitDone};

    #[tokio::test]
    async fn a_watch_that_panics_stops_the_controllers_with_its_panic() {
        // A dispatcher that would run for ever, a quiet watch, and one that dies.
        let quiet_dropped = Arc::new(AtomicBool::new(false));
        struct SetOnDrop(Arc<AtomicBool>);
        impl Drop for SetOnDrop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let guard = SetOnDrop(quiet_dropped.clone());
        let quiet = async move {
            let _guard = guard;
            future::pending::<()>().await;
        };
        let dying = async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            panic!("policy watch died");
        };
        let supervised = tokio::spawn(supervise(
            future::pending(),
            vec![quiet.boxed(), dying.boxed()],
        ));
        let ended = tokio::time::timeout(Duration::from_secs(5), supervised)
            .await
            .expect("the controllers stop");
        let panic = ended.expect_err("by panicking").into_panic();
        assert_eq!(panic.downcast_ref::<&str>(), Some(&"policy watch died"));
        // The other watch went with it (aborted: dropped when the runtime next gets to it).
        for _ in 0..100 {
            if quiet_dropped.load(Ordering::SeqCst) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(
            quiet_dropped.load(Ordering::SeqCst),
            "the quiet watch runs on"
        );
    }

    #[tokio::test]
    async fn the_dispatcher_drops_requests_it_has_no_object_for_freeing_their_slot_and_stops() {
        // One slot, and requests no cache holds (deleted, the deletion missed): each is handed
        // out and dropped, and its slot goes to the next.
        let queue = Arc::new(WorkQueue::new(1, Box::new(|_| 0)));
        for i in 0..5 {
            queue.schedule_now(&RequestKey::new("gone", &format!("r{i}")));
        }
        let (stop, shutdown) = watch::channel(false);
        let dispatcher = tokio::spawn(dispatch(
            queue.clone(),
            Vec::new(),
            Arc::new(Metrics::new()),
            shutdown,
        ));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !queue.is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "requests left queued"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), dispatcher)
            .await
            .expect("the dispatcher stops when asked")
            .unwrap();
    }

    /// The triggers `change_trigger` gives for a sequence of namespace watch events, each applied
    /// to a real reflector store first, as `.reflect()` does.
    fn namespace_triggers(events: Vec<watcher::Event<PartialObjectMeta<Namespace>>>) -> Vec<bool> {
        let (store, mut writer) = reflector::store();
        let flag = || Arc::new(AtomicBool::new(true));
        let mut trigger = change_trigger("Namespace", store, flag());
        events
            .into_iter()
            .map(|event| {
                writer.apply_watcher_event(&event);
                trigger(Ok(event)).into_inner().is_some()
            })
            .collect()
    }

    fn namespace(name: &str, resource_version: u32) -> PartialObjectMeta<Namespace> {
        PartialObjectMeta {
            metadata: ObjectMeta {
                name: Some(name.into()),
                resource_version: Some(resource_version.to_string()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn a_relist_that_finds_what_was_known_reevaluates_nothing() {
        let listing = |versions: [u32; 2]| {
            vec![
                Init,
                InitApply(namespace("team-a", versions[0])),
                InitApply(namespace("team-b", versions[1])),
                InitDone,
            ]
        };
        let mut events = listing([3, 4]);
        // The same objects again, after a watch restart ended in a 410.
        events.extend(listing([3, 4]));
        // A label changed while the watch was down.
        events.extend(listing([3, 9]));
        // A live change, then a relist that finds it.
        events.push(Apply(namespace("team-a", 12)));
        events.extend(listing([12, 9]));
        // A namespace deleted while the watch was down.
        events.extend(vec![Init, InitApply(namespace("team-a", 12)), InitDone]);
        let fired: Vec<usize> = namespace_triggers(events)
            .iter()
            .enumerate()
            .filter_map(|(i, fired)| fired.then_some(i))
            .collect();
        // The first listing, the changed relist, the live change, the relist with one gone.
        assert_eq!(fired, vec![3, 11, 12, 19]);
    }

    fn metadata(name: &str, uid: &str, generation: i64, resource_version: u32) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            namespace: Some("analytics".into()),
            uid: Some(uid.into()),
            generation: Some(generation),
            resource_version: Some(resource_version.to_string()),
            ..ObjectMeta::default()
        }
    }

    fn request(uid: &str, generation: i64, resource_version: u32) -> CachedRequest {
        let mut request = EmbedUrlRequest::new("sales", EmbedUrlRequestSpec::default());
        request.metadata = metadata(&format!("sales-{uid}"), uid, generation, resource_version);
        Guarded(Ok(request))
    }

    fn unreadable(uid: &str, resource_version: u32) -> CachedRequest {
        Guarded(Err(InvalidObject {
            error: "invalid type".into(),
            metadata: metadata(&format!("sales-{uid}"), uid, 1, resource_version),
        }))
    }

    /// Feeds `events` in order: the names of the requests to reconcile after each.
    fn feed(
        intents: &mut UserIntents,
        events: Vec<watcher::Event<CachedRequest>>,
    ) -> Vec<Vec<String>> {
        events
            .into_iter()
            .map(|event| {
                let keys = intents.triggers(event);
                keys.into_iter().map(|key| key.name.to_string()).collect()
            })
            .collect()
    }

    const NONE: Vec<&str> = Vec::new();

    #[test]
    fn only_user_changes_trigger_a_reconcile() {
        let mut annotated = request("u1", 2, 13);
        annotated
            .annotations_mut()
            .insert("embedurl.io/refresh-requested-at".into(), "now".into());
        let after = feed(
            &mut UserIntents::default(),
            vec![
                Apply(request("u1", 1, 10)),
                // The operator's own status write: new resourceVersion, same generation.
                Apply(request("u1", 1, 11)),
                // A spec change.
                Apply(request("u1", 2, 12)),
                // An on-demand refresh.
                Apply(annotated),
                // A request that does not deserialize: any change, since its status may be
                // what is wrong.
                Apply(unreadable("u2", 14)),
                Apply(unreadable("u2", 15)),
                Apply(unreadable("u2", 15)),
            ],
        );
        assert_eq!(
            after,
            [
                vec!["sales-u1"],
                NONE,
                vec!["sales-u1"],
                vec!["sales-u1"],
                vec!["sales-u2"],
                vec!["sales-u2"],
                NONE
            ]
        );
    }

    #[test]
    fn a_list_triggers_when_complete_and_forgets_what_it_no_longer_shows() {
        let mut intents = UserIntents::default();
        // The initial list is reconciled once complete, when the cache shows its objects.
        let after = feed(
            &mut intents,
            vec![
                Init,
                InitApply(request("u1", 1, 10)),
                InitApply(request("u3", 1, 11)),
                InitDone,
                Delete(request("u1", 1, 12)),
                // Created again under the same name: a new uid, a new request.
                Apply(request("u4", 1, 13)),
            ],
        );
        assert_eq!(
            after,
            [
                NONE,
                NONE,
                NONE,
                vec!["sales-u1", "sales-u3"],
                NONE,
                vec!["sales-u4"]
            ]
        );
        assert_eq!(intents.by_request.len(), 2);

        // A relist that no longer shows u3 (deleted while the watch was down) forgets it, and
        // triggers only what changed meanwhile.
        let after = feed(
            &mut intents,
            vec![
                Init,
                InitApply(request("u4", 1, 13)),
                InitApply(request("u5", 1, 14)),
                InitDone,
            ],
        );
        assert_eq!(after, [NONE, NONE, NONE, vec!["sales-u5"]]);
        assert_eq!(intents.by_request.len(), 2);
    }

    #[test]
    fn a_list_that_starts_over_keeps_what_it_triggered() {
        let after = feed(
            &mut UserIntents::default(),
            vec![
                Init,
                InitApply(request("u1", 1, 10)),
                // A page failed: the watcher lists again from the start.
                Init,
                InitApply(request("u1", 1, 10)),
                InitApply(request("u2", 1, 11)),
                InitDone,
            ],
        );
        assert_eq!(after.concat(), ["sales-u1", "sales-u2"]);
        assert_eq!(after[5].len(), 2, "all at the end");
    }
}
