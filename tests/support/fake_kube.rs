//! An in-memory stand-in for the Kubernetes API server, for tests.
//!
//! [`FakeApiServer`] keeps objects as JSON in memory and answers the Kubernetes REST API through
//! an axum [`Router`]. [`FakeApiServer::client`] plugs the router straight into a `kube::Client`
//! (no sockets); [`FakeApiServer::serve_http`] serves the same router on `127.0.0.1:0`, so that a
//! spawned operator binary can reach it through [`FakeApiServer::kubeconfig_yaml`].
//!
//! Modelled on the real API server:
//! - get, list, watch, create, update (PUT), patch and delete under `/api/v1` and
//!   `/apis/{group}/{version}`, namespaced and all-namespace collections and the `status`
//!   subresource, for the kinds in [`BUILTIN_KINDS`] (more through
//!   [`FakeApiServer::register_kind`]);
//! - one global resourceVersion counter; uid, creationTimestamp and generation 1 on create;
//!   generation bumped only when something outside `metadata` and `status` changes (and when a
//!   deletion starts);
//! - a write that changes nothing (managedFields timestamps aside) is not stored: no new
//!   resourceVersion or generation, no watch event;
//! - 409 AlreadyExists on create; 409 Conflict on a stale `metadata.resourceVersion` in a PUT or
//!   patch body; every error is a `metav1.Status` with `code` and `reason`;
//! - for kinds with a status subresource, the main resource ignores `status` (also on create) and
//!   `/status` ignores everything but `status`;
//! - JSON merge patch, JSON patch (RFC 6902) and server-side apply, with per-manager field
//!   ownership in `metadata.managedFields` (FieldsV1), apply conflicts (409) and `force`;
//! - label selectors (`=`, `==`, `!=`, `in`, `notin`, `key`, `!key`) and `metadata.name` /
//!   `metadata.namespace` field selectors on list and watch; `limit` and `continue`;
//!   metadata-only get, list and watch (`as=PartialObjectMetadata` / `PartialObjectMetadataList`);
//! - watch from a resourceVersion replays later changes; one older than the retained history
//!   (see [`FakeApiServer::compact_history`], [`FakeApiServer::set_history_limit`]) gets an
//!   `ERROR` event with a 410 Expired Status;
//!   streaming lists (`sendInitialEvents=true`, ended by a `k8s.io/initial-events-end` bookmark);
//!   with `allowWatchBookmarks=true`, a BOOKMARK at the latest resourceVersion every minute (see
//!   [`FakeApiServer::set_bookmark_interval`]) and 2 s before the watch times out, as the API
//!   server's watch cache sends them, so that a quiet watch resumes where the server is rather
//!   than from a version compaction has passed;
//!   `timeoutSeconds`; an object that leaves a watch's selectors is a DELETED event for it, one
//!   that enters them an ADDED event;
//! - finalizers: deleting an object that has some only sets `deletionTimestamp`; it goes once an
//!   update empties `metadata.finalizers`;
//! - background garbage collection: a few milliseconds after an object goes, the objects whose
//!   `ownerReferences` name its uid are deleted too (in its namespace), transitively;
//! - Secret `stringData` is folded into base64 `data`.
//! - namespace deletion: a Namespace gets `spec.finalizers: [kubernetes]` and `status.phase`
//!   on create; deleting it marks it `Terminating`, and a namespace controller deletes its
//!   contents one resource type at a time (in the order kinds are served, Secrets first), then
//!   the namespace; the NamespaceLifecycle admission plugin refuses creates in a terminating
//!   namespace.
//!
//! What it does NOT do like a real API server (a real cluster may still surprise us here):
//! - No authentication, authorization (RBAC) or admission (webhooks, admission policies); any
//!   bearer token, or none, is accepted.
//! - No validation: no OpenAPI or CRD structural schema, CEL rules, required fields, name format
//!   or immutable-field checks, no pruning of unknown fields; any JSON object is stored as sent.
//! - No defaulting: e.g. a Secret gets no `type: Opaque`; Namespaces are the only kind
//!   defaulted (see above). The only conversion is Secret `stringData` into `data`.
//! - `metadata.generation` is kept on every kind; on a real cluster Secrets, Namespaces, Leases
//!   and Events have none.
//! - Only registered kinds are served: no discovery (`/api`, `/apis`, `/version`), no OpenAPI, no
//!   CustomResourceDefinition objects. The only subresource is `status`, and only for kinds
//!   registered with one (so not for Namespaces); others (scale, eviction, ...) answer 404.
//! - No API priority and fairness or rate limiting: 429 only through `inject_failure`. Plain
//!   HTTP/1.1 only, no TLS, no compression.
//! - Strategic merge patch is treated as a JSON merge patch: no merge keys for lists, no `$patch`
//!   directives.
//! - Server-side apply is simplified: lists (including `ownerReferences` and `finalizers`) are
//!   atomic leaves, no associative-list keys or `x-kubernetes-list-type`, no conversion of managed
//!   fields between versions; apply bodies must be JSON (which kube sends), not YAML;
//!   `managedFields` in a request body is ignored, so a client cannot reset ownership; a Secret's
//!   `stringData` is recorded as ownership of the `data` keys it becomes.
//! - A non-apply write without `fieldManager` is recorded for manager "unknown" (a real server uses
//!   the User-Agent).
//! - Bodies missing `apiVersion`/`kind` are accepted (they must match the URL when present).
//! - `dryRun` is rejected with 400; `deletecollection`, `fieldValidation`, protobuf and Table
//!   output are not supported.
//! - list ignores `resourceVersion` / `resourceVersionMatch` and always serves the current state;
//!   `continue` pages come from the current state, not a snapshot, and never expire; no
//!   `remainingItemCount`.
//! - No size limits like etcd's (about 1.5 MiB per object) or the API server's (3 MiB per
//!   request): only axum's default 2 MB request body limit.
//! - Watch: bookmarks carry the server's latest resourceVersion as soon as a change is stored (a
//!   real watch cache may lag behind etcd); events come at once unless
//!   [`FakeApiServer::set_watch_delay`] makes them lag; no "too large resourceVersion" wait; history is kept until `compact_history()`, or only the last n changes
//!   after `set_history_limit(n)` (a real etcd compacts every few minutes).
//! - Garbage collection ignores `propagationPolicy` (always background, never orphans or
//!   foreground) and grace periods; dependents whose owner never existed are not collected;
//!   objects can live in namespaces that do not exist (the real NamespaceLifecycle plugin
//!   refuses them: 404), and a Namespace's finalizer is removed directly, not through the
//!   `/finalize` subresource. A terminating object still accepts new finalizers.
//! - uids are unique but sequential, and `generateName` suffixes are predictable.

// Every integration-test binary that includes `tests/support` uses a different part of this API.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use bytes::Bytes;
use futures::{Stream, StreamExt, stream};
use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use k8s_openapi::ByteString;
use serde_json::{Map, Value, json};
use tokio::sync::broadcast;
use tokio::time::Instant;

/// A resource type the fake serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ResourceKind {
    /// `v1` for the core group, `group/version` otherwise.
    pub api_version: &'static str,
    /// The URL segment, e.g. `secrets`.
    pub plural: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    /// Whether `/status` exists, and so whether the main resource ignores `status`.
    pub status_subresource: bool,
}

impl ResourceKind {
    pub const fn namespaced(
        api_version: &'static str,
        plural: &'static str,
        kind: &'static str,
    ) -> Self {
        Self {
            api_version,
            plural,
            kind,
            namespaced: true,
            status_subresource: false,
        }
    }

    pub const fn cluster_scoped(
        api_version: &'static str,
        plural: &'static str,
        kind: &'static str,
    ) -> Self {
        Self {
            api_version,
            plural,
            kind,
            namespaced: false,
            status_subresource: false,
        }
    }

    pub const fn with_status(self) -> Self {
        Self {
            status_subresource: true,
            ..self
        }
    }

    /// How error messages name the resource: `secrets`, `leases.coordination.k8s.io`.
    fn qualified_plural(&self) -> String {
        match self.api_version.split_once('/') {
            Some((group, _)) => format!("{}.{group}", self.plural),
            None => self.plural.to_owned(),
        }
    }
}

/// The finalizer the API server puts in every Namespace's `spec.finalizers`.
const NAMESPACE_FINALIZER: &str = "kubernetes";

const NAMESPACES: ResourceKind = ResourceKind::cluster_scoped("v1", "namespaces", "Namespace");

/// The kinds every [`FakeApiServer::new`] serves.
pub const BUILTIN_KINDS: &[ResourceKind] = &[
    ResourceKind::namespaced("v1", "secrets", "Secret"),
    NAMESPACES,
    ResourceKind::namespaced("v1", "events", "Event"),
    ResourceKind::namespaced("events.k8s.io/v1", "events", "Event"),
    ResourceKind::namespaced("coordination.k8s.io/v1", "leases", "Lease"),
    ResourceKind::namespaced(
        "embedurl.io/v1alpha1",
        "embedurlrequests",
        "EmbedUrlRequest",
    )
    .with_status(),
    ResourceKind::cluster_scoped("embedurl.io/v1alpha1", "embedurlpolicies", "EmbedUrlPolicy")
        .with_status(),
];

/// Manager recorded for non-apply writes that name none.
const DEFAULT_FIELD_MANAGER: &str = "unknown";
/// How long after an owner goes its dependents are deleted: the real garbage collector lags too,
/// and tests should not depend on the cascade being instantaneous.
const GARBAGE_COLLECTION_DELAY: Duration = Duration::from_millis(5);
/// Changes buffered per watcher; a watcher further behind is disconnected and must re-watch,
/// rather than silently missing events.
const WATCH_BUFFER: usize = 1024;
/// Watch duration when the request has no `timeoutSeconds`.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);
/// How often a watch that asked for bookmarks gets one (the API server's watch cache: a minute).
const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(60);
/// How long before a watch times out its last bookmark is sent (the API server's: 2 s).
const BOOKMARK_BEFORE_TIMEOUT: Duration = Duration::from_secs(2);
const INITIAL_EVENTS_END: &str = "k8s.io/initial-events-end";
const META_API_VERSION: &str = "meta.k8s.io/v1";
const APPLY: &str = "Apply";
const UPDATE: &str = "Update";
/// Metadata a write cannot change: identity and the fields only the server sets.
const PRESERVED_METADATA: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
];
/// The metadata fields whose ownership server-side apply tracks.
const OWNED_METADATA: &[&str] = &["labels", "annotations", "ownerReferences", "finalizers"];

/// Source of uids and generated names, unique across every server in the process.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The fake API server. Cloning it is cheap and every clone shares the same state.
#[derive(Clone)]
pub struct FakeApiServer {
    store: Arc<Mutex<Store>>,
}

impl Default for FakeApiServer {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeApiServer {
    /// An empty server that serves [`BUILTIN_KINDS`].
    pub fn new() -> Self {
        Self {
            store: Arc::new(Mutex::new(Store::new(BUILTIN_KINDS.to_vec()))),
        }
    }

    /// Serve one more kind (e.g. `ResourceKind::namespaced("v1", "configmaps", "ConfigMap")`).
    pub fn register_kind(&self, kind: ResourceKind) {
        let mut store = self.lock();
        if !store.kinds.contains(&kind) {
            store.kinds.push(kind);
        }
    }

    /// The API as an axum router (a tower `Service`).
    pub fn router(&self) -> Router {
        Router::new()
            .fallback(handle_request)
            .with_state(self.clone())
    }

    /// A client talking to this server in-process, with default namespace "default".
    pub fn client(&self) -> kube::Client {
        kube::Client::new(self.router(), "default")
    }

    /// Serves the API over plain HTTP on an ephemeral 127.0.0.1 port until the runtime shuts down.
    pub async fn serve_http(&self) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let address = listener.local_addr().expect("listener address");
        let router = self.router();
        tokio::spawn(async move {
            axum::serve(listener, router)
                .await
                .expect("fake API server stopped")
        });
        address
    }

    /// A kubeconfig whose current context reaches `http://{address}` with namespace "default".
    pub fn kubeconfig_yaml(address: SocketAddr) -> String {
        format!(
            concat!(
                "apiVersion: v1\n",
                "kind: Config\n",
                "clusters:\n",
                "- name: fake\n",
                "  cluster:\n",
                "    server: http://{address}\n",
                "contexts:\n",
                "- name: fake\n",
                "  context:\n",
                "    cluster: fake\n",
                "    user: fake\n",
                "    namespace: default\n",
                "current-context: fake\n",
                "users:\n",
                "- name: fake\n",
                "  user:\n",
                "    token: fake-token\n",
            ),
            address = address
        )
    }

    /// The stored object, exactly as stored; `namespace` is `None` for cluster-scoped kinds.
    pub fn get(
        &self,
        api_version: &str,
        plural: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let store = self.lock();
        let kind = store.kind(api_version, plural)?;
        let key = ObjectKey {
            kind,
            namespace: namespace.unwrap_or_default().to_owned(),
            name: name.to_owned(),
        };
        store.objects.get(&key).cloned()
    }

    /// Every stored object of a kind, in all namespaces, ordered by namespace and name.
    pub fn list(&self, api_version: &str, plural: &str) -> Vec<Value> {
        let store = self.lock();
        let Some(kind) = store.kind(api_version, plural) else {
            return Vec::new();
        };
        store
            .objects
            .iter()
            .filter(|(key, _)| key.kind == kind)
            .map(|(_, object)| object.clone())
            .collect()
    }

    /// Requests that reached the server with this verb (get, list, watch, create, update, patch,
    /// delete) on this resource: a plural such as "secrets" for the main resource, or
    /// "embedurlrequests/status" for the subresource. Failed and injected-failure requests count.
    pub fn request_count(&self, verb: &str, resource: &str) -> usize {
        let key = (verb.to_owned(), resource.to_owned());
        self.lock().request_counts.get(&key).copied().unwrap_or(0)
    }

    /// Every get, list and watch received so far, in order: what was read, and how.
    pub fn reads(&self) -> Vec<Read> {
        self.lock().reads.clone()
    }

    /// Create, update, patch and delete requests on a plural (any subresource) that changed the
    /// stored state, i.e. bumped the resourceVersion. Garbage collection is not counted.
    pub fn effective_write_count(&self, plural: &str) -> usize {
        self.lock()
            .effective_writes
            .get(plural)
            .copied()
            .unwrap_or(0)
    }

    /// The next `times` requests with this verb (or "*" for any) on this resource (as in
    /// [`Self::request_count`]) fail with `status` and a matching metav1.Status body; a 429 also
    /// carries `Retry-After: 1`.
    pub fn inject_failure(&self, verb: &str, resource: &str, status: u16, times: usize) {
        self.lock().failures.push(InjectedFailure {
            verb: verb.to_owned(),
            resource: resource.to_owned(),
            status,
            remaining: times,
        });
    }

    /// The next `times` requests with this verb (or "*") on this resource are received (and
    /// counted) but never answered, as over a connection whose peer went away without closing it
    /// (an API server replaced mid-upgrade, a load balancer dropping state). Only a client-side
    /// timeout ends them.
    pub fn inject_stall(&self, verb: &str, resource: &str, times: usize) {
        self.push_stall(verb, resource, times, Stall::NoAnswer);
    }

    /// The next `times` requests with this verb (or "*") on this resource get the status line,
    /// the headers and the first half of their answer's body, and then nothing more, as when the
    /// peer vanishes while sending a large list. Only a client-side read timeout ends them.
    pub fn inject_stall_mid_answer(&self, verb: &str, resource: &str, times: usize) {
        self.push_stall(verb, resource, times, Stall::MidAnswer);
    }

    fn push_stall(&self, verb: &str, resource: &str, times: usize, stall: Stall) {
        self.lock().stalls.push(InjectedFailure {
            verb: verb.to_owned(),
            resource: resource.to_owned(),
            status: stall as u16,
            remaining: times,
        });
    }

    /// The injected stall that swallows this request, if any.
    fn stalls(&self, method: &Method, uri: &Uri) -> Option<Stall> {
        let watch = uri
            .query()
            .is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"));
        let mut store = self.lock();
        let route = store.route(uri.path()).ok()?;
        let verb = route.verb(method, watch).ok()?;
        let resource = route.resource_label();
        let stall = store.stalls.iter_mut().find(|stall| {
            stall.remaining > 0
                && stall.resource == resource
                && (stall.verb == "*" || stall.verb == verb.as_str())
        })?;
        let kind = if stall.status == Stall::MidAnswer as u16 {
            Stall::MidAnswer
        } else {
            Stall::NoAnswer
        };
        stall.remaining -= 1;
        store.stalls.retain(|stall| stall.remaining > 0);
        if kind == Stall::NoAnswer {
            // A request answered mid-way is counted when it is dispatched.
            *store
                .request_counts
                .entry((verb.as_str().to_owned(), resource))
                .or_default() += 1;
        }
        Some(kind)
    }

    /// Ends every open watch stream, as an API server restart or a load balancer would.
    pub fn end_all_watches(&self) {
        // An error only means nobody is watching.
        let _ = self.lock().watchers.send(WatchSignal::CloseAll);
    }

    /// Ends the open watches of one resource (a plural such as "secrets"), leaving the others
    /// open, as when watches are spread over API server replicas and one of them goes away.
    pub fn end_watches(&self, plural: &str) {
        // An error only means nobody is watching.
        let _ = self
            .lock()
            .watchers
            .send(WatchSignal::Close(plural.to_owned()));
    }

    /// Forgets the change history, so a watch from any resourceVersion older than the current
    /// one gets 410 Expired, as after an etcd compaction.
    pub fn compact_history(&self) {
        let mut store = self.lock();
        store.history.clear();
        store.oldest_resumable = store.resource_version;
    }

    /// Keeps only the last `changes` changes for watches to resume from (by default all are
    /// kept until [`Self::compact_history`]), as a real etcd compacts. A watch from a
    /// resourceVersion older than what is kept gets 410 Expired. For long runs with many writes
    /// (benchmarks), where the unbounded history would dominate memory.
    pub fn set_history_limit(&self, changes: usize) {
        let mut store = self.lock();
        store.history_limit = Some(changes.max(1));
        store.trim_history();
    }

    /// Serves `plural` as an older CRD would that lacks the field at `pointer` (a JSON pointer
    /// such as `/status/policy`): a server-side apply that sets it fails as a real API server
    /// fails it (500, "field not declared in schema"; structural schemas are enforced on apply),
    /// and other writes have it pruned.
    pub fn undeclare_field(&self, plural: &'static str, pointer: &str) {
        self.lock().undeclared.push((plural, pointer.to_owned()));
    }

    /// Serves every field again, as after the CRDs are upgraded.
    pub fn declare_all_fields(&self) {
        self.lock().undeclared.clear();
    }

    /// How long after an owner is deleted the garbage collector deletes its dependents (5 ms
    /// unless set). The real collector usually takes well under a second, and minutes when it
    /// has a backlog.
    pub fn set_gc_delay(&self, delay: Duration) {
        self.lock().gc_delay = delay;
    }

    /// Watches opened from now on see each change `delay` after it is stored (default at once),
    /// as the API server's watch cache lags behind etcd, and more so under load: a client's
    /// own write is answered before its watch shows it. Reads and lists are not delayed.
    pub fn set_watch_delay(&self, delay: Duration) {
        self.lock().watch_delay = delay;
    }

    /// As [`Self::set_watch_delay`], for the watches of `plural` only, in place of that delay:
    /// one watch cache can lag behind another, so a client may see a change to one kind before
    /// an earlier change to another.
    pub fn set_watch_delay_of(&self, plural: &'static str, delay: Duration) {
        self.lock().watch_delays_by_kind.insert(plural, delay);
    }

    /// How often watches opened from now on that asked for bookmarks get one (default a minute,
    /// as a real API server); the one 2 s before a watch times out is sent regardless.
    pub fn set_bookmark_interval(&self, interval: Duration) {
        self.lock().bookmark_interval = interval.max(Duration::from_millis(10));
    }

    /// Calls `observer` with every change the server stores from now on (creations, updates,
    /// deletions, garbage collection), in resourceVersion order. It runs while the server's state
    /// is locked: it must be quick and must not call the server.
    pub fn observe(&self, observer: impl Fn(&ObservedChange<'_>) + Send + 'static) {
        self.lock().observers.push(Box::new(observer));
    }

    fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().expect("fake API server state poisoned")
    }

    fn dispatch(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<Response, ApiError> {
        let Query(query) = Query::<HashMap<String, String>>::try_from_uri(uri)
            .map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
        let route = self.lock().route(uri.path())?;
        let watch = query.get("watch").is_some_and(|w| w == "true" || w == "1");
        let verb = route.verb(method, watch)?;
        self.lock().admit(verb, &route.resource_label())?;
        if query.contains_key("dryRun") {
            return Err(ApiError::bad_request(
                "dryRun is not supported by the fake API server",
            ));
        }
        let metadata_only = wants_partial_metadata(headers);
        if matches!(verb, Verb::Get | Verb::List | Verb::Watch) {
            self.lock().reads.push(Read {
                verb: verb.as_str(),
                resource: route.resource_label(),
                metadata_only,
                label_selector: query.get("labelSelector").cloned(),
            });
        }
        let manager = query.get("fieldManager").map(String::as_str);
        let request = match verb {
            Verb::Get => {
                let object = self.lock().get_object(&route.object_key())?;
                return Ok(object_response(StatusCode::OK, &object, metadata_only));
            }
            Verb::List => {
                return Ok(
                    Json(self.lock().list_objects(&route, &query, metadata_only)?).into_response(),
                );
            }
            Verb::Watch => return self.watch(&route, &query, metadata_only),
            Verb::Create => WriteRequest::Create(parse_object(body)?),
            Verb::Update => WriteRequest::Modify(Mutation::Replace(parse_object(body)?)),
            Verb::Patch => WriteRequest::Modify(parse_patch(headers, body, &query)?),
            Verb::Delete => {
                let options: Value = if body.is_empty() {
                    Value::Null
                } else {
                    parse_json(body)?
                };
                WriteRequest::Delete(options["preconditions"].clone())
            }
        };
        let manager = match (&request, manager) {
            (WriteRequest::Modify(Mutation::Apply { .. }), None) => {
                return Err(ApiError::bad_request(
                    "fieldManager is required for apply requests",
                ));
            }
            (_, manager) => manager.unwrap_or(DEFAULT_FIELD_MANAGER),
        };
        let deleting_namespace =
            route.kind == NAMESPACES && matches!(request, WriteRequest::Delete(_));
        let outcome = self.lock().perform(&route, request, manager)?;
        if deleting_namespace && outcome.removed.is_none() {
            self.empty_namespace_later(&outcome.object);
        }
        if let Some(owner) = outcome.removed {
            self.collect_garbage_later(owner);
        }
        Ok(object_response(
            outcome.status,
            &outcome.object,
            metadata_only,
        ))
    }

    fn watch(
        &self,
        route: &Route,
        query: &HashMap<String, String>,
        metadata_only: bool,
    ) -> Result<Response, ApiError> {
        let filter = WatchFilter {
            kind: route.kind,
            selection: Selection::from_query(route, query)?,
            metadata_only,
        };
        let timeout = match query.get("timeoutSeconds") {
            Some(seconds) => Duration::from_secs(seconds.parse().map_err(|_| {
                ApiError::bad_request(format!("invalid timeoutSeconds {seconds:?}"))
            })?),
            None => DEFAULT_WATCH_TIMEOUT,
        };
        let bookmarks = query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
        let (replay, live, bookmarks, delay) = {
            let store = self.lock();
            let (replay, live) = store.open_watch(&filter, query)?;
            let bookmarks = bookmarks.then(|| Bookmarks {
                every: store.bookmark_interval,
                resource_version: store.resource_version,
            });
            let delay = store
                .watch_delays_by_kind
                .get(route.kind.plural)
                .copied()
                .unwrap_or(store.watch_delay);
            (replay, live, bookmarks, delay)
        };
        let events = stream::iter(replay)
            .chain(live_events(
                live,
                filter,
                bookmarks,
                Instant::now() + timeout,
                delay,
            ))
            .map(Ok::<_, Infallible>);
        Ok((
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            Body::from_stream(events),
        )
            .into_response())
    }

    /// The namespace controller: deletes the contents of `namespace` (being deleted), one
    /// resource type at a time in the order the kinds are served, a garbage-collection delay
    /// apart, each object as a client's delete would (so its finalizers hold it); once nothing
    /// is left, removes the namespace's own finalizer, and the namespace goes unless other
    /// finalizers hold it.
    fn empty_namespace_later(&self, namespace: &Value) {
        let name = namespace["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let uid = namespace["metadata"]["uid"].clone();
        let server = self.clone();
        tokio::spawn(async move {
            let key = ObjectKey {
                kind: NAMESPACES,
                namespace: String::new(),
                name: name.clone(),
            };
            loop {
                let delay = server.lock().gc_delay.max(Duration::from_millis(5));
                tokio::time::sleep(delay).await;
                let removed = {
                    let mut store = server.lock();
                    match store.objects.get(&key) {
                        Some(object) if object["metadata"]["uid"] == uid => {}
                        // Gone, or a new namespace of the same name.
                        _ => return,
                    }
                    let contents: Vec<ObjectKey> = store
                        .objects
                        .keys()
                        .filter(|k| k.kind.namespaced && k.namespace == name)
                        .cloned()
                        .collect();
                    if contents.is_empty() {
                        let stored = store.objects[&key].clone();
                        let mut candidate = stored.clone();
                        if let Some(finalizers) = candidate["spec"]["finalizers"].as_array_mut() {
                            finalizers.retain(|f| f != NAMESPACE_FINALIZER);
                        }
                        let outcome = store.commit(key.clone(), stored, candidate, StatusCode::OK);
                        drop(store);
                        if let Some(owner) = outcome.removed {
                            server.collect_garbage_later(owner);
                        }
                        return;
                    }
                    // Objects already going wait for their finalizers; the next type goes.
                    let to_delete: Vec<&ObjectKey> = contents
                        .iter()
                        .filter(|k| store.objects[*k]["metadata"]["deletionTimestamp"].is_null())
                        .collect();
                    let kinds = store.kinds.clone();
                    let Some(kind) = kinds
                        .iter()
                        .find(|kind| to_delete.iter().any(|k| k.kind == **kind))
                    else {
                        continue;
                    };
                    to_delete
                        .into_iter()
                        .filter(|k| k.kind == *kind)
                        .filter_map(|k| store.delete(k, &Value::Null).ok()?.removed)
                        .collect::<Vec<_>>()
                };
                for owner in removed {
                    server.collect_garbage_later(owner);
                }
            }
        });
    }

    /// Deletes, after the garbage collection delay, what `owner` owned, then what that owned:
    /// what still names `owner` then, not what did when it went.
    fn collect_garbage_later(&self, owner: RemovedObject) {
        let server = self.clone();
        let delay = self.lock().gc_delay;
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let removed = server.lock().delete_dependents(&owner);
            for dependent in removed {
                server.collect_garbage_later(dependent);
            }
        });
    }
}

async fn handle_request(
    State(server): State<FakeApiServer>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let stall = server.stalls(&method, &uri);
    if stall == Some(Stall::NoAnswer) {
        // Dropped only when the client gives up and closes the connection.
        return std::future::pending().await;
    }
    let response = server
        .dispatch(&method, &uri, &headers, &body)
        .unwrap_or_else(ApiError::into_response);
    if stall != Some(Stall::MidAnswer) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let Ok(whole) = axum::body::to_bytes(body, usize::MAX).await else {
        return std::future::pending().await;
    };
    let half = whole.slice(..whole.len() / 2);
    parts.headers.remove(header::CONTENT_LENGTH);
    let then_nothing =
        stream::once(async move { Ok::<_, Infallible>(half) }).chain(stream::pending());
    Response::from_parts(parts, Body::from_stream(then_nothing))
}

/// How an injected stall treats a request (stored as [`InjectedFailure::status`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stall {
    /// Received, never answered.
    NoAnswer = 0,
    /// Answered with half a body, then silence.
    MidAnswer = 1,
}

/// A change as [`FakeApiServer::observe`] reports it: `before` is `None` for a creation, `after`
/// for a deletion.
pub struct ObservedChange<'a> {
    pub resource_version: u64,
    pub kind: ResourceKind,
    pub before: Option<&'a Value>,
    pub after: Option<&'a Value>,
}

type Observer = Box<dyn Fn(&ObservedChange<'_>) + Send>;

/// A get, list or watch the server received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Read {
    /// `get`, `list` or `watch`.
    pub verb: &'static str,
    /// The plural, with `/subresource` if any.
    pub resource: String,
    /// Whether the client asked for metadata only (`as=PartialObjectMetadata[List]`).
    pub metadata_only: bool,
    pub label_selector: Option<String>,
}

/// Everything the server knows, behind one mutex that is never held across an `.await`.
struct Store {
    kinds: Vec<ResourceKind>,
    objects: BTreeMap<ObjectKey, Value>,
    resource_version: u64,
    /// Changes a watch can still replay, oldest first.
    history: VecDeque<Arc<Change>>,
    /// Most changes kept in `history` (see [`FakeApiServer::set_history_limit`]); `None`: all.
    history_limit: Option<usize>,
    /// How long after an owner goes its dependents are deleted ([`FakeApiServer::set_gc_delay`]).
    gc_delay: Duration,
    /// Fields the installed CRD of a kind does not declare, by plural, as JSON pointers
    /// ([`FakeApiServer::undeclare_field`]).
    undeclared: Vec<(&'static str, String)>,
    bookmark_interval: Duration,
    /// How long after a change is stored the watches see it ([`FakeApiServer::set_watch_delay`]).
    watch_delay: Duration,
    /// Lags of particular kinds' watches, in place of `watch_delay`
    /// ([`FakeApiServer::set_watch_delay_of`]).
    watch_delays_by_kind: HashMap<&'static str, Duration>,
    observers: Vec<Observer>,
    /// A watch may start from this resourceVersion or a later one; older ones get 410.
    oldest_resumable: u64,
    /// Sending happens with the mutex held, so a new watcher's replay and live feed neither
    /// overlap nor leave a gap.
    watchers: broadcast::Sender<WatchSignal>,
    request_counts: HashMap<(String, String), usize>,
    /// Every get, list and watch, as [`FakeApiServer::reads`] returns them.
    reads: Vec<Read>,
    effective_writes: HashMap<String, usize>,
    failures: Vec<InjectedFailure>,
    /// Requests to receive and never answer (`status` unused).
    stalls: Vec<InjectedFailure>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct ObjectKey {
    kind: ResourceKind,
    /// Empty for cluster-scoped kinds.
    namespace: String,
    name: String,
}

/// One stored change, as watchers see it: `before` is `None` for a creation, `after` for a
/// deletion.
struct Change {
    resource_version: u64,
    /// When it was stored.
    at: Instant,
    kind: ResourceKind,
    before: Option<Value>,
    after: Option<Value>,
}

#[derive(Clone)]
enum WatchSignal {
    Change(Arc<Change>),
    CloseAll,
    /// Ends the watches of one plural.
    Close(String),
}

struct InjectedFailure {
    verb: String,
    resource: String,
    status: u16,
    remaining: usize,
}

/// What a request asked for, parsed from its URL.
struct Route {
    kind: ResourceKind,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verb {
    Get,
    List,
    Watch,
    Create,
    Update,
    Patch,
    Delete,
}

impl Verb {
    fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::Patch => "patch",
            Verb::Delete => "delete",
        }
    }
}

enum WriteRequest {
    Create(Value),
    Modify(Mutation),
    /// With the DeleteOptions preconditions (`uid`, `resourceVersion`), or null.
    Delete(Value),
}

/// How a PUT or PATCH computes the new object from the stored one.
enum Mutation {
    Replace(Value),
    /// Also used for strategic merge patches, without their list merge keys and directives.
    MergePatch(Value),
    JsonPatch(Value),
    Apply {
        patch: Value,
        force: bool,
    },
}

struct WriteOutcome {
    object: Value,
    status: StatusCode,
    /// Whether the stored state changed (a new resourceVersion).
    changed: bool,
    /// Set when the object is gone, so that its dependents can be collected.
    removed: Option<RemovedObject>,
}

struct RemovedObject {
    uid: String,
    /// `None` for a cluster-scoped owner, whose dependents may be in any namespace.
    namespace: Option<String>,
}

/// Who a write is attributed to in `managedFields`.
#[derive(Clone, Copy)]
struct Owner<'a> {
    manager: &'a str,
    operation: &'static str,
    subresource: Option<&'a str>,
}

impl<'a> Owner<'a> {
    fn new(manager: &'a str, operation: &'static str, subresource: Option<&'a str>) -> Self {
        Self {
            manager,
            operation,
            subresource,
        }
    }
}

impl Route {
    fn verb(&self, method: &Method, watch: bool) -> Result<Verb, ApiError> {
        let verb = match (method.as_str(), self.name.is_some()) {
            ("GET", true) => Verb::Get,
            ("GET", false) if watch => Verb::Watch,
            ("GET", false) => Verb::List,
            ("POST", false) => Verb::Create,
            ("PUT", true) => Verb::Update,
            ("PATCH", true) => Verb::Patch,
            ("DELETE", true) => Verb::Delete,
            _ => {
                return Err(ApiError::new(
                    405,
                    "MethodNotAllowed",
                    format!("{method} is not supported here"),
                ));
            }
        };
        // Only list and watch may span namespaces.
        if self.kind.namespaced
            && self.namespace.is_none()
            && !matches!(verb, Verb::List | Verb::Watch)
        {
            return Err(ApiError::unknown_path());
        }
        Ok(verb)
    }

    fn resource_label(&self) -> String {
        match &self.subresource {
            Some(subresource) => format!("{}/{subresource}", self.kind.plural),
            None => self.kind.plural.to_owned(),
        }
    }

    /// The addressed object; only meaningful for item routes, which `verb` has checked.
    fn object_key(&self) -> ObjectKey {
        ObjectKey {
            kind: self.kind,
            namespace: self.namespace.clone().unwrap_or_default(),
            name: self.name.clone().unwrap_or_default(),
        }
    }
}

impl Store {
    fn new(kinds: Vec<ResourceKind>) -> Self {
        let (watchers, _) = broadcast::channel(WATCH_BUFFER);
        Self {
            kinds,
            objects: BTreeMap::new(),
            // Starts above 0 because resourceVersion "0" means "any" to list and watch.
            resource_version: 1,
            history: VecDeque::new(),
            history_limit: None,
            gc_delay: GARBAGE_COLLECTION_DELAY,
            undeclared: Vec::new(),
            bookmark_interval: DEFAULT_BOOKMARK_INTERVAL,
            watch_delay: Duration::ZERO,
            watch_delays_by_kind: HashMap::new(),
            observers: Vec::new(),
            oldest_resumable: 0,
            watchers,
            request_counts: HashMap::new(),
            reads: Vec::new(),
            effective_writes: HashMap::new(),
            failures: Vec::new(),
            stalls: Vec::new(),
        }
    }

    fn kind(&self, api_version: &str, plural: &str) -> Option<ResourceKind> {
        self.kinds
            .iter()
            .copied()
            .find(|kind| kind.api_version == api_version && kind.plural == plural)
    }

    fn route(&self, path: &str) -> Result<Route, ApiError> {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (api_version, rest) = match segments.as_slice() {
            ["api", "v1", rest @ ..] => ("v1".to_owned(), rest),
            ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
            _ => return Err(ApiError::unknown_path()),
        };
        let find = |plural: &str| self.kind(&api_version, plural);
        // `/namespaces/{ns}/{plural}...` is a namespaced path; `/namespaces/{name}` is a Namespace.
        let (namespace, rest) = match rest {
            ["namespaces", namespace, plural, ..]
                if find(plural).is_some_and(|kind| kind.namespaced) =>
            {
                (Some((*namespace).to_owned()), &rest[2..])
            }
            _ => (None, rest),
        };
        let (plural, name, subresource) = match rest {
            [plural] => (*plural, None, None),
            [plural, name] => (*plural, Some((*name).to_owned()), None),
            [plural, name, subresource] => (
                *plural,
                Some((*name).to_owned()),
                Some((*subresource).to_owned()),
            ),
            _ => return Err(ApiError::unknown_path()),
        };
        let kind = find(plural).ok_or_else(ApiError::unknown_path)?;
        if subresource
            .as_deref()
            .is_some_and(|subresource| subresource != "status" || !kind.status_subresource)
        {
            return Err(ApiError::unknown_path());
        }
        Ok(Route {
            kind,
            namespace,
            name,
            subresource,
        })
    }

    /// Counts the request, then fails it if a matching failure was injected.
    fn admit(&mut self, verb: Verb, resource: &str) -> Result<(), ApiError> {
        *self
            .request_counts
            .entry((verb.as_str().to_owned(), resource.to_owned()))
            .or_default() += 1;
        let injected = self.failures.iter_mut().find(|failure| {
            failure.remaining > 0
                && failure.resource == resource
                && (failure.verb == "*" || failure.verb == verb.as_str())
        });
        let Some(failure) = injected else {
            return Ok(());
        };
        failure.remaining -= 1;
        let status = failure.status;
        self.failures.retain(|failure| failure.remaining > 0);
        Err(ApiError::new(
            status,
            reason_for(status),
            format!("injected failure for {} {resource}", verb.as_str()),
        ))
    }

    fn get_object(&self, key: &ObjectKey) -> Result<Value, ApiError> {
        self.objects
            .get(key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(key))
    }

    fn list_objects(
        &self,
        route: &Route,
        query: &HashMap<String, String>,
        metadata_only: bool,
    ) -> Result<Value, ApiError> {
        let selection = Selection::from_query(route, query)?;
        let limit = match query.get("limit") {
            Some(limit) => limit
                .parse::<usize>()
                .map_err(|_| ApiError::bad_request(format!("invalid limit {limit:?}")))?,
            None => 0,
        };
        // The continue token is the `namespace/name` of the last item of the previous page.
        let start_after = match query.get("continue") {
            Some(token) => Some(
                token
                    .split_once('/')
                    .ok_or_else(|| ApiError::bad_request("invalid continue token"))?,
            ),
            None => None,
        };
        let mut matching: Vec<(&ObjectKey, &Value)> = self
            .objects
            .iter()
            .filter(|(key, object)| {
                key.kind == route.kind
                    && start_after
                        .is_none_or(|after| (key.namespace.as_str(), key.name.as_str()) > after)
                    && selection.matches(object)
            })
            .collect();
        let mut metadata = json!({ "resourceVersion": self.resource_version.to_string() });
        if limit > 0 && matching.len() > limit {
            matching.truncate(limit);
            let (last, _) = matching[limit - 1];
            metadata["continue"] = json!(format!("{}/{}", last.namespace, last.name));
        }
        let (api_version, kind) = if metadata_only {
            (
                META_API_VERSION.to_owned(),
                "PartialObjectMetadataList".to_owned(),
            )
        } else {
            (
                route.kind.api_version.to_owned(),
                format!("{}List", route.kind.kind),
            )
        };
        let items: Vec<Value> = matching
            .into_iter()
            .map(|(_, object)| present(object, metadata_only))
            .collect();
        Ok(json!({ "apiVersion": api_version, "kind": kind, "metadata": metadata, "items": items }))
    }

    /// The events a new watch starts with, and its live feed (`None` when the watch ends at once).
    fn open_watch(
        &self,
        filter: &WatchFilter,
        query: &HashMap<String, String>,
    ) -> Result<(Vec<Bytes>, Option<broadcast::Receiver<WatchSignal>>), ApiError> {
        let from = query.get("resourceVersion").map_or("", String::as_str);
        let send_initial_events = query.get("sendInitialEvents").map(String::as_str);
        if from.is_empty() || from == "0" {
            let mut initial = Vec::new();
            if send_initial_events != Some("false") {
                initial.extend(
                    self.objects
                        .iter()
                        .filter(|(key, object)| {
                            key.kind == filter.kind && filter.selection.matches(object)
                        })
                        .map(|(_, object)| filter.event("ADDED", object)),
                );
            }
            if send_initial_events == Some("true") {
                initial.push(filter.initial_events_end(self.resource_version));
            }
            return Ok((initial, Some(self.watchers.subscribe())));
        }
        let from: u64 = from
            .parse()
            .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {from:?}")))?;
        if from < self.oldest_resumable {
            // A real API server answers 200 and reports the expiry as the only event.
            let message = format!(
                "too old resource version: {from} ({})",
                self.oldest_resumable
            );
            return Ok((
                vec![event_line("ERROR", status_object(410, "Expired", &message))],
                None,
            ));
        }
        let replay = self
            .history
            .iter()
            .filter(|change| change.resource_version > from)
            .filter_map(|change| filter.render(change))
            .collect();
        Ok((replay, Some(self.watchers.subscribe())))
    }

    fn perform(
        &mut self,
        route: &Route,
        request: WriteRequest,
        manager: &str,
    ) -> Result<WriteOutcome, ApiError> {
        let outcome = match request {
            WriteRequest::Create(body) => {
                self.create(route, body, Owner::new(manager, UPDATE, None))?
            }
            WriteRequest::Modify(mutation) => self.write(route, mutation, manager)?,
            WriteRequest::Delete(preconditions) => {
                self.delete(&route.object_key(), &preconditions)?
            }
        };
        if outcome.changed {
            *self
                .effective_writes
                .entry(route.kind.plural.to_owned())
                .or_default() += 1;
        }
        Ok(outcome)
    }

    fn create(
        &mut self,
        route: &Route,
        mut object: Value,
        owner: Owner,
    ) -> Result<WriteOutcome, ApiError> {
        let kind = route.kind;
        check_type_meta(kind, &object)?;
        object["apiVersion"] = json!(kind.api_version);
        object["kind"] = json!(kind.kind);
        let namespace = route.namespace.clone().unwrap_or_default();
        let metadata = metadata_mut(&mut object);
        if kind.namespaced
            && metadata
                .get("namespace")
                .and_then(Value::as_str)
                .is_some_and(|sent| sent != namespace)
        {
            return Err(ApiError::bad_request(concat!(
                "the namespace of the provided object does not match ",
                "the namespace sent on the request"
            )));
        }
        if metadata
            .get("resourceVersion")
            .and_then(Value::as_str)
            .is_some_and(|version| !version.is_empty())
        {
            return Err(ApiError::bad_request(
                "resourceVersion should not be set on objects to be created",
            ));
        }
        let name = match (
            metadata.get("name").and_then(Value::as_str),
            metadata.get("generateName").and_then(Value::as_str),
        ) {
            (Some(name), _) if !name.is_empty() => name.to_owned(),
            (_, Some(prefix)) if !prefix.is_empty() => {
                format!("{prefix}{}", generated_name_suffix())
            }
            _ => return Err(ApiError::invalid("name or generateName is required")),
        };
        check_object_name(&name)?;
        if kind.namespaced {
            self.check_namespace_accepts_content(&namespace, kind.plural, &name)?;
        }
        for field in PRESERVED_METADATA {
            metadata.remove(*field);
        }
        metadata.insert("name".into(), json!(name));
        if kind.namespaced {
            metadata.insert("namespace".into(), json!(namespace));
        }
        metadata.insert("uid".into(), json!(new_uid()));
        metadata.insert("creationTimestamp".into(), json!(now()));
        metadata.insert("generation".into(), json!(1));
        if kind.status_subresource {
            remove_field(&mut object, "status");
        }
        normalize(kind, &mut object);
        if kind == NAMESPACES {
            // Defaulted as the API server does: the namespace controller's finalizer holds a
            // namespace being deleted until its contents are gone.
            object["spec"]["finalizers"] = json!([NAMESPACE_FINALIZER]);
            object["status"]["phase"] = json!("Active");
        }
        let key = ObjectKey {
            kind,
            namespace,
            name,
        };
        if self.objects.contains_key(&key) {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!(
                    "{} \"{}\" already exists",
                    kind.qualified_plural(),
                    key.name
                ),
            ));
        }
        let mut fields = ManagedFields::default();
        fields.entry_mut(owner, kind.api_version).fields = tracked_leaves(&object, kind, None);
        fields.write(&mut object);
        self.resource_version += 1;
        set_resource_version(&mut object, self.resource_version);
        self.objects.insert(key, object.clone());
        self.publish(kind, None, Some(object.clone()));
        Ok(WriteOutcome {
            object,
            status: StatusCode::CREATED,
            changed: true,
            removed: None,
        })
    }

    fn write(
        &mut self,
        route: &Route,
        mutation: Mutation,
        manager: &str,
    ) -> Result<WriteOutcome, ApiError> {
        let (kind, key, subresource) =
            (route.kind, route.object_key(), route.subresource.as_deref());
        let Some(stored) = self.objects.get(&key).cloned() else {
            return match mutation {
                // Apply creates what does not exist yet.
                Mutation::Apply { mut patch, .. } if subresource.is_none() => {
                    check_name(&key, &patch)?;
                    metadata_mut(&mut patch).insert("name".into(), json!(key.name));
                    self.create(route, patch, Owner::new(manager, APPLY, None))
                }
                _ => Err(ApiError::not_found(&key)),
            };
        };
        let operation = if matches!(mutation, Mutation::Apply { .. }) {
            APPLY
        } else {
            UPDATE
        };
        let owner = Owner::new(manager, operation, subresource);
        let mut fields = ManagedFields::read(&stored);
        let (candidate, applied) = match mutation {
            Mutation::Replace(body) => {
                check_type_meta(kind, &body)?;
                (body, None)
            }
            Mutation::MergePatch(patch) => {
                let mut candidate = stored.clone();
                merge_patch(&mut candidate, &patch);
                (candidate, None)
            }
            Mutation::JsonPatch(operations) => (json_patch(stored.clone(), &operations)?, None),
            Mutation::Apply { mut patch, force } => {
                check_type_meta(kind, &patch)?;
                if let Some(pointer) = self.undeclared_in(kind, &patch) {
                    return Err(ApiError::new(
                        500,
                        "InternalError",
                        format!(
                            "failed to create typed patch object ({}/{}; {}, Kind={}): {}: field not declared in schema",
                            key.namespace,
                            key.name,
                            kind.api_version,
                            kind.kind,
                            pointer.replace('/', ".")
                        ),
                    ));
                }
                // Fold stringData first, so the manager owns the `data` keys that are stored.
                normalize(kind, &mut patch);
                let applied = tracked_leaves(&patch, kind, subresource);
                // Fields this manager applied last time and no longer sends go, unless someone
                // else also owns them.
                let mut candidate = stored.clone();
                for stale in fields.owned_by(owner).difference(&applied) {
                    if !fields.owned_by_others(owner, stale) {
                        remove_path(&mut candidate, stale);
                    }
                }
                merge_patch(&mut candidate, &patch);
                (candidate, Some((applied, force)))
            }
        };
        if !candidate.is_object() {
            return Err(ApiError::invalid(
                "the result of the patch is not a JSON object",
            ));
        }
        let mut candidate = candidate;
        while let Some(pointer) = self.undeclared_in(kind, &candidate) {
            remove_path_pointer(&mut candidate, &pointer);
        }
        check_name(&key, &candidate)?;
        let sent_version = candidate["metadata"]["resourceVersion"]
            .as_str()
            .filter(|version| !version.is_empty());
        if sent_version
            .is_some_and(|version| Some(version) != stored["metadata"]["resourceVersion"].as_str())
        {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{}\": the object has been modified; \
                     please apply your changes to the latest version and try again",
                    kind.qualified_plural(),
                    key.name
                ),
            ));
        }
        let mut candidate = scope_to_subresource(kind, subresource, &stored, candidate);
        carry_preserved_metadata(&stored, &mut candidate);
        normalize(kind, &mut candidate);
        if kind == NAMESPACES {
            // As the API server's namespace strategy: an update keeps the finalizers (changed
            // only through `/finalize`) and the status.
            candidate["spec"]["finalizers"] = stored["spec"]["finalizers"].clone();
            candidate["status"] = stored["status"].clone();
        }
        match applied {
            Some((applied, force)) => {
                let conflicts = fields.conflicts(owner, &applied, &stored, &candidate);
                if !conflicts.is_empty() && !force {
                    return Err(ApiError::new(409, "Conflict", fields.describe(&conflicts)));
                }
                fields.release(&conflicts);
                fields.entry_mut(owner, kind.api_version).fields = applied;
            }
            None => {
                let mut changed = tracked_leaves(&candidate, kind, subresource);
                changed.retain(|path| value_at(&stored, path) != value_at(&candidate, path));
                fields.take_ownership(owner, kind.api_version, changed);
            }
        }
        fields.prune(&candidate);
        fields.write(&mut candidate);
        Ok(self.commit(key, stored, candidate, StatusCode::OK))
    }

    fn delete(&mut self, key: &ObjectKey, preconditions: &Value) -> Result<WriteOutcome, ApiError> {
        let stored = self.get_object(key)?;
        for field in ["uid", "resourceVersion"] {
            if let Some(expected) = preconditions[field].as_str()
                && stored["metadata"][field].as_str() != Some(expected)
            {
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    format!("Precondition failed: {field} in precondition: {expected}"),
                ));
            }
        }
        if !has_finalizers(&stored) {
            return Ok(self.remove(key, stored));
        }
        if stored["metadata"].get("deletionTimestamp").is_some() {
            return Ok(WriteOutcome {
                object: stored,
                status: StatusCode::ACCEPTED,
                changed: false,
                removed: None,
            });
        }
        let mut candidate = stored.clone();
        let metadata = metadata_mut(&mut candidate);
        metadata.insert("deletionTimestamp".into(), json!(now()));
        metadata.insert("deletionGracePeriodSeconds".into(), json!(0));
        if key.kind == NAMESPACES {
            candidate["status"]["phase"] = json!("Terminating");
        }
        bump_generation(&mut candidate);
        Ok(self.commit(key.clone(), stored, candidate, StatusCode::ACCEPTED))
    }

    /// Deletes every object that names `owner` in its ownerReferences; returns those now gone.
    fn delete_dependents(&mut self, owner: &RemovedObject) -> Vec<RemovedObject> {
        let dependents: Vec<ObjectKey> = self
            .objects
            .iter()
            .filter(|(key, object)| {
                owner
                    .namespace
                    .as_ref()
                    .is_none_or(|namespace| *namespace == key.namespace)
                    && object["metadata"]["ownerReferences"]
                        .as_array()
                        .is_some_and(|references| {
                            references
                                .iter()
                                .any(|reference| reference["uid"] == owner.uid.as_str())
                        })
            })
            .map(|(key, _)| key.clone())
            .collect();
        dependents
            .iter()
            .filter_map(|key| self.delete(key, &Value::Null).ok()?.removed)
            .collect()
    }

    /// Stores `candidate` in place of `stored`, unless nothing but managedFields timestamps differ.
    fn commit(
        &mut self,
        key: ObjectKey,
        stored: Value,
        mut candidate: Value,
        status: StatusCode,
    ) -> WriteOutcome {
        if without_managed_times(&candidate) == without_managed_times(&stored) {
            return WriteOutcome {
                object: stored,
                status,
                changed: false,
                removed: None,
            };
        }
        if spec_changed(&stored, &candidate) {
            bump_generation(&mut candidate);
        }
        if candidate["metadata"].get("deletionTimestamp").is_some() && !has_finalizers(&candidate) {
            return self.remove(&key, candidate);
        }
        self.resource_version += 1;
        set_resource_version(&mut candidate, self.resource_version);
        self.objects.insert(key.clone(), candidate.clone());
        self.publish(key.kind, Some(stored), Some(candidate.clone()));
        WriteOutcome {
            object: candidate,
            status,
            changed: true,
            removed: None,
        }
    }

    fn remove(&mut self, key: &ObjectKey, mut object: Value) -> WriteOutcome {
        self.objects.remove(key);
        self.resource_version += 1;
        set_resource_version(&mut object, self.resource_version);
        self.publish(key.kind, Some(object.clone()), None);
        let removed = RemovedObject {
            uid: object["metadata"]["uid"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            namespace: key.kind.namespaced.then(|| key.namespace.clone()),
        };
        WriteOutcome {
            object,
            status: StatusCode::OK,
            changed: true,
            removed: Some(removed),
        }
    }

    fn publish(&mut self, kind: ResourceKind, before: Option<Value>, after: Option<Value>) {
        let change = Arc::new(Change {
            resource_version: self.resource_version,
            at: Instant::now(),
            kind,
            before,
            after,
        });
        for observer in &self.observers {
            observer(&ObservedChange {
                resource_version: change.resource_version,
                kind,
                before: change.before.as_ref(),
                after: change.after.as_ref(),
            });
        }
        self.history.push_back(change.clone());
        self.trim_history();
        // An error only means nobody is watching.
        let _ = self.watchers.send(WatchSignal::Change(change));
    }

    /// Drops the oldest changes beyond the history limit.
    fn trim_history(&mut self) {
        let limit = self.history_limit.unwrap_or(usize::MAX);
        while self.history.len() > limit {
            if let Some(dropped) = self.history.pop_front() {
                // A watch from the last dropped change's resourceVersion misses nothing.
                self.oldest_resumable = dropped.resource_version;
            }
        }
    }
}

/// What a list or watch sees of a kind: namespace, labelSelector and fieldSelector.
struct Selection {
    namespace: Option<String>,
    labels: Vec<LabelRequirement>,
    fields: Vec<FieldRequirement>,
}

struct LabelRequirement {
    key: String,
    operator: LabelOperator,
}

/// `k=v` is `In([v])` and `k!=v` is `NotIn([v])`: the same semantics, including that `!=` matches
/// objects without the label.
enum LabelOperator {
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
}

struct FieldRequirement {
    /// Only `metadata.name` and `metadata.namespace` are supported.
    field: String,
    value: String,
    equal: bool,
}

impl Selection {
    fn from_query(route: &Route, query: &HashMap<String, String>) -> Result<Self, ApiError> {
        let labels = query.get("labelSelector").map_or("", String::as_str);
        let fields = query.get("fieldSelector").map_or("", String::as_str);
        Ok(Self {
            namespace: route.namespace.clone(),
            labels: split_top_level(labels)
                .map(parse_label_requirement)
                .collect::<Result<_, _>>()?,
            fields: fields
                .split(',')
                .filter(|term| !term.trim().is_empty())
                .map(parse_field_requirement)
                .collect::<Result<_, _>>()?,
        })
    }

    fn matches(&self, object: &Value) -> bool {
        let metadata = &object["metadata"];
        let namespace = metadata["namespace"].as_str().unwrap_or_default();
        let name = metadata["name"].as_str().unwrap_or_default();
        self.namespace
            .as_deref()
            .is_none_or(|wanted| wanted == namespace)
            && self.labels.iter().all(|requirement| {
                let value = metadata["labels"][&requirement.key].as_str();
                match &requirement.operator {
                    LabelOperator::In(values) => {
                        value.is_some_and(|value| values.iter().any(|v| v == value))
                    }
                    LabelOperator::NotIn(values) => {
                        value.is_none_or(|value| values.iter().all(|v| v != value))
                    }
                    LabelOperator::Exists => value.is_some(),
                    LabelOperator::DoesNotExist => value.is_none(),
                }
            })
            && self.fields.iter().all(|requirement| {
                let actual = if requirement.field == "metadata.name" {
                    name
                } else {
                    namespace
                };
                (actual == requirement.value) == requirement.equal
            })
    }
}

/// Splits a label selector on the commas that are not inside `in (...)` value lists.
fn split_top_level(selector: &str) -> impl Iterator<Item = &str> {
    let mut depth = 0_i32;
    selector
        .split(move |c: char| {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ => {}
            }
            c == ',' && depth == 0
        })
        .map(str::trim)
        .filter(|term| !term.is_empty())
}

fn parse_label_requirement(term: &str) -> Result<LabelRequirement, ApiError> {
    let invalid = || ApiError::bad_request(format!("unable to parse requirement {term:?}"));
    let requirement = |key: &str, operator| {
        let key = key.trim();
        if key.is_empty() {
            Err(invalid())
        } else {
            Ok(LabelRequirement {
                key: key.to_owned(),
                operator,
            })
        }
    };
    if let Some((head, values)) = term.strip_suffix(')').and_then(|term| term.split_once('(')) {
        let values = values
            .split(',')
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
            .collect();
        return match head.split_whitespace().collect::<Vec<_>>().as_slice() {
            [key, "in"] => requirement(key, LabelOperator::In(values)),
            [key, "notin"] => requirement(key, LabelOperator::NotIn(values)),
            _ => Err(invalid()),
        };
    }
    if let Some(key) = term.strip_prefix('!') {
        return requirement(key, LabelOperator::DoesNotExist);
    }
    if let Some((key, value)) = term.split_once("!=") {
        return requirement(key, LabelOperator::NotIn(vec![value.trim().to_owned()]));
    }
    if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
        return requirement(key, LabelOperator::In(vec![value.trim().to_owned()]));
    }
    requirement(term, LabelOperator::Exists)
}

fn parse_field_requirement(term: &str) -> Result<FieldRequirement, ApiError> {
    let (field, value, equal) = if let Some((field, value)) = term.split_once("!=") {
        (field, value, false)
    } else if let Some((field, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
        (field, value, true)
    } else {
        return Err(ApiError::bad_request(format!(
            "invalid field selector {term:?}"
        )));
    };
    let field = field.trim();
    if field != "metadata.name" && field != "metadata.namespace" {
        return Err(ApiError::bad_request(format!(
            "field label not supported: {field}"
        )));
    }
    Ok(FieldRequirement {
        field: field.to_owned(),
        value: value.trim().to_owned(),
        equal,
    })
}

/// What one watch sees, and how it renders changes as events.
struct WatchFilter {
    kind: ResourceKind,
    selection: Selection,
    metadata_only: bool,
}

impl WatchFilter {
    fn event(&self, event_type: &str, object: &Value) -> Bytes {
        event_line(event_type, present(object, self.metadata_only))
    }

    /// The event this watcher gets for a change, if any. Like the real watch cache, an object that
    /// stops matching is a DELETED event (its last matching state at the new resourceVersion) and
    /// one that starts matching is an ADDED event.
    fn render(&self, change: &Change) -> Option<Bytes> {
        if change.kind != self.kind {
            return None;
        }
        let before = change
            .before
            .as_ref()
            .filter(|object| self.selection.matches(object));
        let after = change
            .after
            .as_ref()
            .filter(|object| self.selection.matches(object));
        match (before, after) {
            (Some(_), Some(object)) => Some(self.event("MODIFIED", object)),
            (None, Some(object)) => Some(self.event("ADDED", object)),
            (Some(object), None) => {
                let mut object = object.clone();
                set_resource_version(&mut object, change.resource_version);
                Some(self.event("DELETED", &object))
            }
            (None, None) => None,
        }
    }

    /// The bookmark that ends the initial events of a streaming list.
    fn initial_events_end(&self, resource_version: u64) -> Bytes {
        self.bookmark(resource_version, json!({ INITIAL_EVENTS_END: "true" }))
    }

    /// A BOOKMARK event: the watch has seen everything up to `resource_version`.
    fn bookmark(&self, resource_version: u64, annotations: Value) -> Bytes {
        let (api_version, kind) = if self.metadata_only {
            (META_API_VERSION, "PartialObjectMetadata")
        } else {
            (self.kind.api_version, self.kind.kind)
        };
        let mut metadata = json!({ "resourceVersion": resource_version.to_string() });
        if annotations.as_object().is_some_and(|a| !a.is_empty()) {
            metadata["annotations"] = annotations;
        }
        event_line(
            "BOOKMARK",
            json!({ "apiVersion": api_version, "kind": kind, "metadata": metadata }),
        )
    }
}

/// The periodic bookmarks of a watch that asked for them.
struct Bookmarks {
    every: Duration,
    /// The latest resourceVersion the watch has been told about or skipped past (changes of
    /// other kinds or outside its selectors move it too, as etcd's revision does).
    resource_version: u64,
}

impl Bookmarks {
    /// When the next bookmark is due: a period from now, but never later than 2 s before the
    /// watch ends; once that one is sent, none until the end.
    fn next_after(&self, now: Instant, deadline: Instant) -> Instant {
        let last_call = deadline.checked_sub(BOOKMARK_BEFORE_TIMEOUT).unwrap_or(now);
        if now < last_call {
            (now + self.every).min(last_call)
        } else {
            deadline
        }
    }
}

fn live_events(
    receiver: Option<broadcast::Receiver<WatchSignal>>,
    filter: WatchFilter,
    bookmarks: Option<Bookmarks>,
    deadline: Instant,
    delay: Duration,
) -> impl Stream<Item = Bytes> {
    let first_bookmark = bookmarks
        .as_ref()
        .map_or(deadline, |b| b.next_after(Instant::now(), deadline));
    stream::unfold(
        receiver.map(|receiver| (receiver, filter, bookmarks, first_bookmark)),
        move |state| async move {
            let (mut receiver, filter, mut bookmarks, mut next_bookmark) = state?;
            loop {
                let wake = next_bookmark.min(deadline);
                // Looked at first: a watch whose changes never pause still times out and gets
                // its bookmarks, as the API server's timer fires whatever the traffic.
                let signal = if Instant::now() >= wake {
                    Err(())
                } else {
                    tokio::time::timeout_at(wake, receiver.recv())
                        .await
                        .map_err(|_| ())
                };
                match signal {
                    Ok(Ok(WatchSignal::Change(change))) => {
                        // Every change waits the same: order is kept, lag does not add up.
                        if !delay.is_zero() {
                            tokio::time::sleep_until(change.at + delay).await;
                        }
                        if let Some(bookmarks) = bookmarks.as_mut() {
                            bookmarks.resource_version = change.resource_version;
                        }
                        if let Some(line) = filter.render(&change) {
                            let state = (receiver, filter, bookmarks, next_bookmark);
                            return Some((line, Some(state)));
                        }
                    }
                    // Timed out, closed by end_all_watches, or more than WATCH_BUFFER changes
                    // behind: end the stream; the client re-watches from the last
                    // resourceVersion it saw and catches up from the history.
                    Ok(Ok(WatchSignal::Close(plural))) => {
                        if plural == filter.kind.plural {
                            return None;
                        }
                    }
                    Ok(Ok(WatchSignal::CloseAll) | Err(_)) => return None,
                    Err(()) => {
                        let now = Instant::now();
                        // The deadline, or a bookmark due before it.
                        let due = bookmarks.as_ref().filter(|_| now < deadline)?;
                        let line = filter.bookmark(due.resource_version, json!({}));
                        next_bookmark = due.next_after(now, deadline);
                        return Some((line, Some((receiver, filter, bookmarks, next_bookmark))));
                    }
                }
            }
        },
    )
}

/// One watch event, `type` first as the API server writes it (Go's field order). `json!` sorts
/// keys, which put `object` first and made kube buffer every watched object before parsing it,
/// a cost no real server causes.
fn event_line(event_type: &str, object: Value) -> Bytes {
    Bytes::from(format!(
        "{{\"type\":{},\"object\":{object}}}\n",
        Value::from(event_type)
    ))
}

/// The object, or only its metadata as a `PartialObjectMetadata`.
fn present(object: &Value, metadata_only: bool) -> Value {
    if metadata_only {
        json!({
            "apiVersion": META_API_VERSION,
            "kind": "PartialObjectMetadata",
            "metadata": object["metadata"],
        })
    } else {
        object.clone()
    }
}

fn object_response(status: StatusCode, object: &Value, metadata_only: bool) -> Response {
    (status, Json(present(object, metadata_only))).into_response()
}

/// Whether the Accept header asks for `as=PartialObjectMetadata` or `as=PartialObjectMetadataList`.
fn wants_partial_metadata(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split([',', ';']))
        .any(|parameter| parameter.trim().starts_with("as=PartialObjectMetadata"))
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|error| ApiError::bad_request(format!("invalid JSON body: {error}")))
}

fn parse_object(body: &[u8]) -> Result<Value, ApiError> {
    let value = parse_json(body)?;
    if value.is_object() {
        Ok(value)
    } else {
        Err(ApiError::bad_request("the body must be a JSON object"))
    }
}

fn parse_patch(
    headers: &HeaderMap,
    body: &[u8],
    query: &HashMap<String, String>,
) -> Result<Mutation, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    match content_type.split(';').next().unwrap_or_default().trim() {
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
            Ok(Mutation::MergePatch(parse_json(body)?))
        }
        "application/json-patch+json" => Ok(Mutation::JsonPatch(parse_json(body)?)),
        // The body kube sends is JSON, which is also YAML.
        "application/apply-patch+yaml" => Ok(Mutation::Apply {
            patch: parse_object(body)?,
            force: query.get("force").is_some_and(|force| force == "true"),
        }),
        other => Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            format!("unsupported patch content type {other:?}"),
        )),
    }
}

/// A body's apiVersion and kind, when present, must be those of the URL.
fn check_type_meta(kind: ResourceKind, object: &Value) -> Result<(), ApiError> {
    for (field, expected) in [("apiVersion", kind.api_version), ("kind", kind.kind)] {
        if let Some(sent) = object[field].as_str()
            && sent != expected
        {
            return Err(ApiError::bad_request(format!(
                "{field} {sent:?} does not match the URL ({expected:?})"
            )));
        }
    }
    Ok(())
}

fn check_name(key: &ObjectKey, object: &Value) -> Result<(), ApiError> {
    match object["metadata"]["name"].as_str() {
        Some(name) if name != key.name => Err(ApiError::bad_request(format!(
            "the name of the object ({name}) does not match the name on the URL ({})",
            key.name
        ))),
        _ => Ok(()),
    }
}

/// For kinds with a status subresource, the main resource keeps the stored status and
/// `/status` keeps everything but the status.
fn scope_to_subresource(
    kind: ResourceKind,
    subresource: Option<&str>,
    stored: &Value,
    candidate: Value,
) -> Value {
    let with_status_of = |mut object: Value, source: &Value| {
        match source.get("status") {
            Some(status) => object["status"] = status.clone(),
            None => remove_field(&mut object, "status"),
        }
        object
    };
    match (kind.status_subresource, subresource) {
        (false, _) => candidate,
        (true, Some(_)) => with_status_of(stored.clone(), &candidate),
        (true, None) => with_status_of(candidate, stored),
    }
}

fn carry_preserved_metadata(stored: &Value, candidate: &mut Value) {
    candidate["apiVersion"] = stored["apiVersion"].clone();
    candidate["kind"] = stored["kind"].clone();
    let metadata = metadata_mut(candidate);
    for field in PRESERVED_METADATA {
        match stored["metadata"].get(*field) {
            Some(value) => metadata.insert((*field).to_owned(), value.clone()),
            None => metadata.remove(*field),
        };
    }
}

/// Folds Secret `stringData` into base64 `data`, as the real API server does on every write.
fn normalize(kind: ResourceKind, object: &mut Value) {
    if (kind.api_version, kind.plural) != ("v1", "secrets") {
        return;
    }
    let Some(Value::Object(string_data)) = object
        .as_object_mut()
        .and_then(|object| object.remove("stringData"))
    else {
        return;
    };
    if !object["data"].is_object() {
        object["data"] = json!({});
    }
    for (key, value) in string_data {
        let bytes = ByteString(value.as_str().unwrap_or_default().as_bytes().to_vec());
        object["data"][key.as_str()] =
            serde_json::to_value(bytes).expect("bytes serialize to a base64 string");
    }
}

/// Whether anything outside `metadata` and `status` differs, which is what bumps generation.
fn spec_changed(stored: &Value, candidate: &Value) -> bool {
    let spec = |object: &Value| -> BTreeMap<String, Value> {
        object
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(key, _)| *key != "metadata" && *key != "status")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    spec(stored) != spec(candidate)
}

fn without_managed_times(object: &Value) -> Value {
    let mut object = object.clone();
    if let Some(entries) = object["metadata"]
        .get_mut("managedFields")
        .and_then(Value::as_array_mut)
    {
        for entry in entries {
            remove_field(entry, "time");
        }
    }
    object
}

fn has_finalizers(object: &Value) -> bool {
    let non_empty = |finalizers: &Value| finalizers.as_array().is_some_and(|f| !f.is_empty());
    non_empty(&object["metadata"]["finalizers"])
        // A Namespace's own, which only the namespace controller removes.
        || (object["kind"] == NAMESPACES.kind && non_empty(&object["spec"]["finalizers"]))
}

fn bump_generation(object: &mut Value) {
    let metadata = metadata_mut(object);
    let generation = metadata
        .get("generation")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    metadata.insert("generation".into(), json!(generation + 1));
}

fn set_resource_version(object: &mut Value, resource_version: u64) {
    metadata_mut(object).insert(
        "resourceVersion".into(),
        json!(resource_version.to_string()),
    );
}

/// `object.metadata` as a map, created if missing. `object` must be a JSON object.
fn metadata_mut(object: &mut Value) -> &mut Map<String, Value> {
    let metadata = &mut object["metadata"];
    if !metadata.is_object() {
        *metadata = Value::Object(Map::new());
    }
    match metadata {
        Value::Object(map) => map,
        _ => unreachable!("metadata was just made an object"),
    }
}

fn remove_field(object: &mut Value, field: &str) {
    if let Some(map) = object.as_object_mut() {
        map.remove(field);
    }
}

fn new_uid() -> String {
    format!(
        "00000000-0000-4000-8000-{:012x}",
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

/// Five characters from the alphabet the real API server uses for generateName.
/// Removes the member a JSON pointer names, if there is one.
fn remove_path_pointer(document: &mut Value, pointer: &str) {
    let Some((parent, last)) = pointer.rsplit_once('/') else {
        return;
    };
    if let Some(Value::Object(members)) = document.pointer_mut(parent) {
        members.remove(last);
    }
}

impl Store {
    /// The first field of `kind` that its CRD does not declare and `object` sets.
    fn undeclared_in(&self, kind: ResourceKind, object: &Value) -> Option<String> {
        self.undeclared
            .iter()
            .find(|(plural, pointer)| *plural == kind.plural && object.pointer(pointer).is_some())
            .map(|(_, pointer)| pointer.clone())
    }

    /// The NamespaceLifecycle admission plugin, on in every cluster: nothing new is created in a
    /// namespace being deleted (one with a deletionTimestamp; its finalizers still hold it).
    fn check_namespace_accepts_content(
        &self,
        namespace: &str,
        plural: &str,
        name: &str,
    ) -> Result<(), ApiError> {
        let key = ObjectKey {
            kind: NAMESPACES,
            namespace: String::new(),
            name: namespace.to_owned(),
        };
        let terminating = self
            .objects
            .get(&key)
            .is_some_and(|object| object["metadata"]["deletionTimestamp"].is_string());
        if terminating {
            // As the NamespaceLifecycle plugin words it, with its machine-readable cause.
            let mut error = ApiError::new(
                403,
                "Forbidden",
                format!(
                    "{plural} \"{name}\" is forbidden: unable to create new content in namespace {namespace} because it is being terminated"
                ),
            );
            error.details = Some(json!({
                "name": name,
                "kind": plural,
                "causes": [{
                    "reason": "NamespaceTerminating",
                    "message": format!("namespace {namespace} is being terminated"),
                    "field": "metadata.namespace",
                }],
            }));
            return Err(error);
        }
        Ok(())
    }
}

/// Object names are DNS subdomains, as the API server checks for Secrets, Events, Leases and
/// custom resources: at most 253 characters of lower-case letters, digits, `-` and `.`, each
/// dot-separated label starting and ending with a letter or digit.
fn check_object_name(name: &str) -> Result<(), ApiError> {
    let label_ok = |label: &str| {
        !label.is_empty()
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    if name.len() > 253 {
        return Err(ApiError::invalid(format!(
            "metadata.name: Invalid value: {name:?}: must be no more than 253 characters"
        )));
    }
    if !name.split('.').all(label_ok) {
        return Err(ApiError::invalid(format!(
            "metadata.name: Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist \
             of lower case alphanumeric characters, '-' or '.', and must start and end with an \
             alphanumeric character"
        )));
    }
    Ok(())
}

fn generated_name_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut n = NEXT_ID
        .fetch_add(1, Ordering::Relaxed)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..5)
        .map(|_| {
            let c = ALPHABET[(n % ALPHABET.len() as u64) as usize];
            n /= ALPHABET.len() as u64;
            char::from(c)
        })
        .collect()
}

fn now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// RFC 7386 JSON merge patch: objects merge recursively, `null` deletes, anything else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(target) = target else {
        unreachable!("target was just made an object")
    };
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// RFC 6902 JSON patch: add, remove, replace, move, copy and test.
fn json_patch(mut document: Value, operations: &Value) -> Result<Value, ApiError> {
    let operations = operations
        .as_array()
        .ok_or_else(|| ApiError::bad_request("a JSON patch must be an array"))?;
    for operation in operations {
        let path = operation["path"]
            .as_str()
            .ok_or_else(|| ApiError::bad_request("JSON patch operation without path"))?;
        let value = || {
            operation
                .get("value")
                .cloned()
                .ok_or_else(|| ApiError::bad_request("JSON patch operation without value"))
        };
        let from = || {
            operation["from"]
                .as_str()
                .ok_or_else(|| ApiError::bad_request("JSON patch operation without from"))
        };
        match operation["op"].as_str().unwrap_or_default() {
            "add" => pointer_insert(&mut document, path, value()?)?,
            "remove" => drop(pointer_take(&mut document, path)?),
            "replace" => {
                pointer_take(&mut document, path)?;
                pointer_insert(&mut document, path, value()?)?;
            }
            "move" => {
                let moved = pointer_take(&mut document, from()?)?;
                pointer_insert(&mut document, path, moved)?;
            }
            "copy" => {
                let copied = document
                    .pointer(from()?)
                    .cloned()
                    .ok_or_else(|| missing_path(path))?;
                pointer_insert(&mut document, path, copied)?;
            }
            "test" => {
                if document.pointer(path) != Some(&value()?) {
                    return Err(ApiError::invalid(format!(
                        "JSON patch test failed at {path}"
                    )));
                }
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown JSON patch operation {other:?}"
                )));
            }
        }
    }
    Ok(document)
}

fn missing_path(path: &str) -> ApiError {
    ApiError::invalid(format!("JSON patch path {path} does not exist"))
}

/// The parent pointer and the unescaped last token of a JSON pointer.
fn split_pointer(path: &str) -> Result<(&str, String), ApiError> {
    let (parent, token) = path
        .rsplit_once('/')
        .ok_or_else(|| ApiError::bad_request(format!("invalid JSON pointer {path:?}")))?;
    Ok((parent, token.replace("~1", "/").replace("~0", "~")))
}

fn pointer_insert(document: &mut Value, path: &str, value: Value) -> Result<(), ApiError> {
    if path.is_empty() {
        *document = value;
        return Ok(());
    }
    let (parent, token) = split_pointer(path)?;
    match document.pointer_mut(parent) {
        Some(Value::Object(map)) => {
            map.insert(token, value);
        }
        Some(Value::Array(items)) => {
            let index = if token == "-" {
                Some(items.len())
            } else {
                token.parse().ok().filter(|&i| i <= items.len())
            };
            items.insert(index.ok_or_else(|| missing_path(path))?, value);
        }
        _ => return Err(missing_path(path)),
    }
    Ok(())
}

fn pointer_take(document: &mut Value, path: &str) -> Result<Value, ApiError> {
    let (parent, token) = split_pointer(path)?;
    let taken = match document.pointer_mut(parent) {
        Some(Value::Object(map)) => map.remove(&token),
        Some(Value::Array(items)) => token
            .parse()
            .ok()
            .filter(|&i| i < items.len())
            .map(|i| items.remove(i)),
        _ => None,
    };
    taken.ok_or_else(|| missing_path(path))
}

/// A field path such as `["data", "url"]`.
type FieldPath = Vec<String>;

/// One `metadata.managedFields` entry: the leaf fields a manager owns through one operation.
struct ManagedEntry {
    manager: String,
    operation: String,
    subresource: Option<String>,
    api_version: String,
    time: String,
    fields: BTreeSet<FieldPath>,
}

impl ManagedEntry {
    fn is(&self, owner: Owner) -> bool {
        self.manager == owner.manager
            && self.operation == owner.operation
            && self.subresource.as_deref() == owner.subresource
    }
}

/// A field `entry` owns (`owned`) that an apply would change (`field` is the shorter of the
/// overlapping paths).
struct Conflict {
    entry: usize,
    owned: FieldPath,
    field: FieldPath,
}

/// The `metadata.managedFields` of one object, as sets of leaf paths per manager and operation.
#[derive(Default)]
struct ManagedFields(Vec<ManagedEntry>);

impl ManagedFields {
    fn read(object: &Value) -> Self {
        let entries = object["metadata"]["managedFields"]
            .as_array()
            .into_iter()
            .flatten();
        Self(
            entries
                .map(|entry| {
                    let text = |field: &str| entry[field].as_str().unwrap_or_default().to_owned();
                    let mut fields = BTreeSet::new();
                    collect_owned_paths(&entry["fieldsV1"], &mut Vec::new(), &mut fields);
                    ManagedEntry {
                        manager: text("manager"),
                        operation: text("operation"),
                        subresource: entry["subresource"].as_str().map(str::to_owned),
                        api_version: text("apiVersion"),
                        time: text("time"),
                        fields,
                    }
                })
                .collect(),
        )
    }

    /// Stores the entries that still own something into `object.metadata.managedFields`.
    fn write(self, object: &mut Value) {
        let entries: Vec<Value> = self
            .0
            .into_iter()
            .filter(|entry| !entry.fields.is_empty())
            .map(|entry| {
                let mut value = json!({
                    "manager": entry.manager,
                    "operation": entry.operation,
                    "apiVersion": entry.api_version,
                    "time": entry.time,
                    "fieldsType": "FieldsV1",
                    "fieldsV1": fields_v1(&entry.fields),
                });
                if let Some(subresource) = entry.subresource {
                    value["subresource"] = json!(subresource);
                }
                value
            })
            .collect();
        let metadata = metadata_mut(object);
        if entries.is_empty() {
            metadata.remove("managedFields");
        } else {
            metadata.insert("managedFields".into(), Value::Array(entries));
        }
    }

    /// The entry for `owner`, created if missing, stamped with the current time.
    fn entry_mut(&mut self, owner: Owner, api_version: &str) -> &mut ManagedEntry {
        let index = match self.0.iter().position(|entry| entry.is(owner)) {
            Some(index) => index,
            None => {
                self.0.push(ManagedEntry {
                    manager: owner.manager.to_owned(),
                    operation: owner.operation.to_owned(),
                    subresource: owner.subresource.map(str::to_owned),
                    api_version: String::new(),
                    time: String::new(),
                    fields: BTreeSet::new(),
                });
                self.0.len() - 1
            }
        };
        let entry = &mut self.0[index];
        entry.api_version = api_version.to_owned();
        entry.time = now();
        entry
    }

    fn owned_by(&self, owner: Owner) -> BTreeSet<FieldPath> {
        self.0
            .iter()
            .filter(|entry| entry.is(owner))
            .flat_map(|entry| entry.fields.iter().cloned())
            .collect()
    }

    fn owned_by_others(&self, owner: Owner, path: &[String]) -> bool {
        self.0.iter().filter(|entry| !entry.is(owner)).any(|entry| {
            entry
                .fields
                .iter()
                .any(|owned| common_field(owned, path).is_some())
        })
    }

    /// Fields other entries own that the apply would change. Like the real server, the same
    /// manager's earlier non-apply writes count as another owner.
    fn conflicts(
        &self,
        owner: Owner,
        applied: &BTreeSet<FieldPath>,
        stored: &Value,
        candidate: &Value,
    ) -> Vec<Conflict> {
        let mut conflicts = Vec::new();
        for (index, entry) in self
            .0
            .iter()
            .enumerate()
            .filter(|(_, entry)| !entry.is(owner))
        {
            for owned in &entry.fields {
                let changed = applied
                    .iter()
                    .filter_map(|path| common_field(owned, path))
                    .find(|field| value_at(stored, field) != value_at(candidate, field));
                if let Some(field) = changed {
                    conflicts.push(Conflict {
                        entry: index,
                        owned: owned.clone(),
                        field: field.to_vec(),
                    });
                }
            }
        }
        conflicts
    }

    fn describe(&self, conflicts: &[Conflict]) -> String {
        let details: Vec<String> = conflicts
            .iter()
            .map(|conflict| {
                let entry = &self.0[conflict.entry];
                let using = if entry.operation == UPDATE {
                    format!(" using {}", entry.api_version)
                } else {
                    String::new()
                };
                format!(
                    "conflict with \"{}\"{using}: .{}",
                    entry.manager,
                    conflict.field.join(".")
                )
            })
            .collect();
        let plural = if conflicts.len() == 1 { "" } else { "s" };
        format!(
            "Apply failed with {} conflict{plural}: {}",
            conflicts.len(),
            details.join(", ")
        )
    }

    /// Forced apply: the conflicting fields change hands.
    fn release(&mut self, conflicts: &[Conflict]) {
        for conflict in conflicts {
            self.0[conflict.entry].fields.remove(&conflict.owned);
        }
    }

    /// A non-apply write: its manager takes the fields it changed from everyone else.
    fn take_ownership(&mut self, owner: Owner, api_version: &str, changed: BTreeSet<FieldPath>) {
        if changed.is_empty() {
            return;
        }
        for entry in self.0.iter_mut().filter(|entry| !entry.is(owner)) {
            entry.fields.retain(|owned| {
                changed
                    .iter()
                    .all(|path| common_field(owned, path).is_none())
            });
        }
        self.entry_mut(owner, api_version).fields.extend(changed);
    }

    /// Drops ownership of fields that no longer exist.
    fn prune(&mut self, object: &Value) {
        for entry in &mut self.0 {
            entry.fields.retain(|path| value_at(object, path).is_some());
        }
    }
}

/// The shorter of two paths when one contains the other (they then refer to the same data).
fn common_field<'a>(a: &'a [String], b: &'a [String]) -> Option<&'a [String]> {
    if a.starts_with(b) {
        Some(b)
    } else if b.starts_with(a) {
        Some(a)
    } else {
        None
    }
}

/// The leaf paths of `object` whose ownership is tracked for writes to `subresource`: values
/// that are not non-empty objects (lists are atomic), excluding apiVersion, kind and the metadata
/// only the server sets.
fn tracked_leaves(
    object: &Value,
    kind: ResourceKind,
    subresource: Option<&str>,
) -> BTreeSet<FieldPath> {
    let mut leaves = BTreeSet::new();
    collect_leaves(object, &mut Vec::new(), &mut leaves);
    leaves.retain(|path| match path.split_first() {
        Some((top, rest)) => match top.as_str() {
            "apiVersion" | "kind" => false,
            "metadata" => {
                subresource.is_none()
                    && rest
                        .first()
                        .is_some_and(|field| OWNED_METADATA.contains(&field.as_str()))
            }
            "status" if kind.status_subresource => subresource.is_some(),
            _ => subresource.is_none(),
        },
        None => false,
    });
    leaves
}

fn collect_leaves(value: &Value, prefix: &mut FieldPath, leaves: &mut BTreeSet<FieldPath>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (key, child) in map {
                prefix.push(key.clone());
                collect_leaves(child, prefix, leaves);
                prefix.pop();
            }
        }
        _ if !prefix.is_empty() => {
            leaves.insert(prefix.clone());
        }
        _ => {}
    }
}

/// FieldsV1 (`{"f:data": {"f:url": {}}}`) from leaf paths.
fn fields_v1(paths: &BTreeSet<FieldPath>) -> Value {
    let mut root = Value::Object(Map::new());
    for path in paths {
        let mut node = &mut root;
        for segment in path {
            node = &mut node[format!("f:{segment}").as_str()];
            if !node.is_object() {
                *node = Value::Object(Map::new());
            }
        }
    }
    root
}

/// Leaf paths from FieldsV1, the inverse of [`fields_v1`].
fn collect_owned_paths(node: &Value, prefix: &mut FieldPath, paths: &mut BTreeSet<FieldPath>) {
    let children: Vec<(&str, &Value)> = node
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(key, child)| Some((key.strip_prefix("f:")?, child)))
        .collect();
    if children.is_empty() {
        if !prefix.is_empty() {
            paths.insert(prefix.clone());
        }
        return;
    }
    for (name, child) in children {
        prefix.push(name.to_owned());
        collect_owned_paths(child, prefix, paths);
        prefix.pop();
    }
}

fn value_at<'a>(object: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter()
        .try_fold(object, |value, segment| value.get(segment))
}

/// Removes the field at `path`, and the objects that removal leaves empty.
fn remove_path(value: &mut Value, path: &[String]) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    let Some(map) = value.as_object_mut() else {
        return;
    };
    if rest.is_empty() {
        map.remove(first);
    } else if let Some(child) = map.get_mut(first) {
        remove_path(child, rest);
        if child.as_object().is_some_and(Map::is_empty) {
            map.remove(first);
        }
    }
}

/// An error answered as a `metav1.Status`, which kube turns into `kube::Error::Api`.
#[derive(Debug)]
struct ApiError {
    code: u16,
    reason: &'static str,
    message: String,
    /// The Status's `details`, when the real API server gives some a client may act on.
    details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(422, "Invalid", message)
    }

    fn not_found(key: &ObjectKey) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{}\" not found", key.kind.qualified_plural(), key.name),
        )
    }

    fn unknown_path() -> Self {
        Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    }

    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut object = status_object(self.code, self.reason, &self.message);
        if let Some(details) = self.details {
            object["details"] = details;
        }
        let mut response = (status, Json(object)).into_response();
        if self.code == 429 {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

fn status_object(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

/// The metav1.Status reason the real API server gives with an HTTP status.
fn reason_for(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        409 => "Conflict",
        410 => "Expired",
        415 => "UnsupportedMediaType",
        422 => "Invalid",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::pin::pin;
    use std::sync::atomic::AtomicUsize;

    use futures::TryStreamExt;
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};
    use kube::api::{
        Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams, WatchEvent,
        WatchParams,
    };
    use kube::config::{KubeConfigOptions, Kubeconfig};
    use kube::runtime::controller::{Action, Controller};
    use kube::runtime::{reflector, watcher};
    use kube::{CustomResource, Resource, ResourceExt};
    use schemars::JsonSchema;
    use serde::{Deserialize, Serialize};
    use tower::ServiceExt;

    #[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema)]
    #[kube(
        group = "embedurl.io",
        version = "v1alpha1",
        kind = "EmbedUrlRequest",
        namespaced
    )]
    #[kube(status = "EmbedUrlRequestStatus")]
    pub struct EmbedUrlRequestSpec {
        url: String,
    }

    #[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
    #[serde(rename_all = "camelCase")]
    pub struct EmbedUrlRequestStatus {
        secret_name: Option<String>,
    }

    fn secret(name: &str, labels: &[(&str, &str)]) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            string_data: Some(BTreeMap::from([(
                "url".to_owned(),
                format!("https://example.com/{name}"),
            )])),
            ..Secret::default()
        }
    }

    fn request(name: &str, url: &str) -> EmbedUrlRequest {
        EmbedUrlRequest::new(
            name,
            EmbedUrlRequestSpec {
                url: url.to_owned(),
            },
        )
    }

    fn api_error(error: kube::Error) -> (u16, String) {
        match error {
            kube::Error::Api(status) => (status.code, status.reason.clone()),
            other => panic!("expected an API error, got {other:?}"),
        }
    }

    async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
        for _ in 0..300 {
            if condition() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }

    fn names(store: &reflector::Store<Secret>) -> Vec<String> {
        let mut names: Vec<String> = store
            .state()
            .iter()
            .map(|object| object.name_any())
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn crud_conflicts_and_not_found() {
        let server = FakeApiServer::new();
        let secrets: Api<Secret> = Api::default_namespaced(server.client());
        let created = secrets
            .create(&PostParams::default(), &secret("a", &[]))
            .await
            .unwrap();
        assert!(created.metadata.uid.is_some() && created.metadata.creation_timestamp.is_some());
        assert_eq!(created.metadata.generation, Some(1));
        assert_eq!(created.data.unwrap()["url"].0, b"https://example.com/a");
        let (code, reason) = api_error(
            secrets
                .create(&PostParams::default(), &secret("a", &[]))
                .await
                .unwrap_err(),
        );
        assert_eq!((code, reason.as_str()), (409, "AlreadyExists"));

        let fetched = secrets.get("a").await.unwrap();
        assert_eq!(
            fetched.resource_version(),
            created.metadata.resource_version
        );
        let listed = secrets.list(&ListParams::default()).await.unwrap();
        assert_eq!(listed.items.len(), 1);
        assert_eq!(
            listed.metadata.resource_version,
            created.metadata.resource_version
        );

        let mut stale = fetched.clone();
        stale.metadata.resource_version = Some("1".to_owned());
        let (code, reason) = api_error(
            secrets
                .replace("a", &PostParams::default(), &stale)
                .await
                .unwrap_err(),
        );
        assert_eq!((code, reason.as_str()), (409, "Conflict"));
        let mut current = fetched;
        current.metadata.labels = Some(BTreeMap::from([("app".to_owned(), "web".to_owned())]));
        let replaced = secrets
            .replace("a", &PostParams::default(), &current)
            .await
            .unwrap();
        assert_ne!(
            replaced.resource_version(),
            created.metadata.resource_version
        );

        secrets.delete("a", &DeleteParams::default()).await.unwrap();
        let (code, reason) = api_error(secrets.get("a").await.unwrap_err());
        assert_eq!((code, reason.as_str()), (404, "NotFound"));
        assert_eq!(server.request_count("create", "secrets"), 2);
        assert_eq!(server.effective_write_count("secrets"), 3);

        // A finalizer holds the object until an update removes it.
        let mut guarded = secret("guarded", &[]);
        guarded.metadata.finalizers = Some(vec!["example.com/cleanup".to_owned()]);
        secrets
            .create(&PostParams::default(), &guarded)
            .await
            .unwrap();
        secrets
            .delete("guarded", &DeleteParams::default())
            .await
            .unwrap();
        assert!(
            secrets
                .get("guarded")
                .await
                .unwrap()
                .metadata
                .deletion_timestamp
                .is_some()
        );
        secrets
            .patch(
                "guarded",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": null}})),
            )
            .await
            .unwrap();
        assert!(
            server
                .get("v1", "secrets", Some("default"), "guarded")
                .is_none()
        );
    }

    #[tokio::test]
    async fn list_selectors_pagination_and_metadata_only() {
        let server = FakeApiServer::new();
        let client = server.client();
        let default: Api<Secret> = Api::namespaced(client.clone(), "default");
        let other: Api<Secret> = Api::namespaced(client.clone(), "other");
        for (name, tier) in [("a", "web"), ("b", "db"), ("c", "cache")] {
            default
                .create(&PostParams::default(), &secret(name, &[("tier", tier)]))
                .await
                .unwrap();
        }
        other
            .create(&PostParams::default(), &secret("d", &[]))
            .await
            .unwrap();
        let names_matching = |selector: &'static str| {
            let default = default.clone();
            async move {
                let list = default
                    .list(&ListParams::default().labels(selector))
                    .await
                    .unwrap();
                list.items
                    .iter()
                    .map(ResourceExt::name_any)
                    .collect::<Vec<_>>()
            }
        };
        assert_eq!(names_matching("tier=web").await, ["a"]);
        assert_eq!(names_matching("tier!=web").await, ["b", "c"]);
        assert_eq!(names_matching("tier in (web, db)").await, ["a", "b"]);
        assert_eq!(names_matching("tier notin (web,db),tier").await, ["c"]);
        assert_eq!(names_matching("!tier").await, Vec::<String>::new());
        let all: Api<Secret> = Api::all(client.clone());
        let unlabelled = all
            .list(&ListParams::default().labels("!tier"))
            .await
            .unwrap();
        assert_eq!(unlabelled.items[0].namespace().as_deref(), Some("other"));
        let by_name = all
            .list(&ListParams::default().fields("metadata.name=b"))
            .await
            .unwrap();
        assert_eq!(by_name.items.len(), 1);

        let first = default.list(&ListParams::default().limit(2)).await.unwrap();
        assert_eq!(first.items.len(), 2);
        let token = first.metadata.continue_.clone().expect("a continue token");
        let rest = default
            .list(&ListParams::default().limit(2).continue_token(&token))
            .await
            .unwrap();
        assert_eq!(
            rest.items
                .iter()
                .map(ResourceExt::name_any)
                .collect::<Vec<_>>(),
            ["c"]
        );
        assert!(rest.metadata.continue_.is_none());

        let metadata = all.list_metadata(&ListParams::default()).await.unwrap();
        assert_eq!(metadata.items.len(), 4);
        assert_eq!(
            metadata.items[0].types.as_ref().unwrap().kind,
            "PartialObjectMetadata"
        );
        assert!(
            metadata
                .items
                .iter()
                .all(|item| item.metadata.uid.is_some())
        );

        server.register_kind(ResourceKind::namespaced("v1", "configmaps", "ConfigMap"));
        let config_maps: Api<ConfigMap> = Api::default_namespaced(client);
        let config_map = ConfigMap {
            metadata: ObjectMeta {
                generate_name: Some("settings-".to_owned()),
                ..ObjectMeta::default()
            },
            ..ConfigMap::default()
        };
        let created = config_maps
            .create(&PostParams::default(), &config_map)
            .await
            .unwrap();
        assert!(created.name_any().starts_with("settings-"));
        assert_eq!(server.list("v1", "configmaps").len(), 1);
    }

    #[tokio::test]
    async fn generation_status_subresource_and_no_op_writes() {
        let server = FakeApiServer::new();
        let requests: Api<EmbedUrlRequest> = Api::default_namespaced(server.client());
        let mut with_status = request("dash", "https://a");
        with_status.status = Some(EmbedUrlRequestStatus {
            secret_name: Some("ignored".to_owned()),
        });
        let created = requests
            .create(&PostParams::default(), &with_status)
            .await
            .unwrap();
        assert!(created.status.is_none(), "status is dropped on create");

        let patched = requests
            .patch(
                "dash",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"url": "https://b"}})),
            )
            .await
            .unwrap();
        assert_eq!(patched.metadata.generation, Some(2));
        let status_patch =
            json!({"spec": {"url": "https://ignored"}, "status": {"secretName": "dash-url"}});
        let with_status = requests
            .patch_status("dash", &PatchParams::default(), &Patch::Merge(status_patch))
            .await
            .unwrap();
        assert_eq!(with_status.spec.url, "https://b");
        assert_eq!(
            with_status.status.unwrap().secret_name.as_deref(),
            Some("dash-url")
        );
        assert_eq!(with_status.metadata.generation, Some(2));
        let main = requests
            .patch(
                "dash",
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"secretName": "x"}})),
            )
            .await
            .unwrap();
        assert_eq!(
            main.status.as_ref().unwrap().secret_name.as_deref(),
            Some("dash-url")
        );
        assert_eq!(
            main.resource_version(),
            with_status.metadata.resource_version,
            "an ignored status is a no-op"
        );

        let labelled = requests
            .patch(
                "dash",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"a": "b"}}})),
            )
            .await
            .unwrap();
        assert_eq!(labelled.metadata.generation, Some(2));
        assert_ne!(labelled.resource_version(), main.resource_version());
        let writes = server.effective_write_count("embedurlrequests");
        let again = requests
            .patch(
                "dash",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"a": "b"}}})),
            )
            .await
            .unwrap();
        assert_eq!(again.resource_version(), labelled.resource_version());
        assert_eq!(server.effective_write_count("embedurlrequests"), writes);

        let operations = serde_json::from_value(json!([
            {"op": "test", "path": "/spec/url", "value": "https://b"},
            {"op": "replace", "path": "/spec/url", "value": "https://c"},
        ]))
        .unwrap();
        let json_patched = requests
            .patch(
                "dash",
                &PatchParams::default(),
                &Patch::<()>::Json(operations),
            )
            .await
            .unwrap();
        assert_eq!(
            (
                json_patched.spec.url.as_str(),
                json_patched.metadata.generation
            ),
            ("https://c", Some(3))
        );
        let failing_test = serde_json::from_value(
            json!([{"op": "test", "path": "/spec/url", "value": "https://b"}]),
        )
        .unwrap();
        let error = requests
            .patch(
                "dash",
                &PatchParams::default(),
                &Patch::<()>::Json(failing_test),
            )
            .await
            .unwrap_err();
        assert_eq!(api_error(error).0, 422);
        let stale = json!({"metadata": {"resourceVersion": "2"}, "spec": {"url": "https://d"}});
        let error = requests
            .patch("dash", &PatchParams::default(), &Patch::Merge(stale))
            .await
            .unwrap_err();
        assert_eq!(api_error(error).0, 409);
    }

    #[tokio::test]
    async fn names_must_be_dns_subdomains_of_at_most_253_characters() {
        let server = FakeApiServer::new();
        let secrets: Api<Secret> = Api::default_namespaced(server.client());
        let named = |name: &str| Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
            ..Secret::default()
        };
        let longest = format!("{}.{}", "a".repeat(200), "b".repeat(52));
        for good in ["a", "x-1.y", longest.as_str()] {
            secrets
                .create(&PostParams::default(), &named(good))
                .await
                .unwrap();
        }
        for bad in [
            format!("{longest}c"),
            "Upper".into(),
            "a-.b".into(),
            "a..b".into(),
        ] {
            let error = secrets
                .create(&PostParams::default(), &named(&bad))
                .await
                .unwrap_err();
            assert_eq!(api_error(error).0, 422, "{bad}");
            // Server-side apply of a new object is a create, and checked alike.
            let error = secrets
                .patch(
                    &bad,
                    &PatchParams::apply("test"),
                    &Patch::Apply(named(&bad)),
                )
                .await
                .unwrap_err();
            assert_eq!(api_error(error).0, 422, "{bad}");
        }
    }

    #[tokio::test]
    async fn deleting_a_namespace_deletes_its_contents_then_the_namespace() {
        use k8s_openapi::api::core::v1::Namespace;
        let server = FakeApiServer::new();
        let client = server.client();
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some("going".into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        let created = namespaces
            .create(&PostParams::default(), &namespace)
            .await
            .unwrap();
        assert_eq!(
            created.spec.unwrap().finalizers,
            Some(vec!["kubernetes".to_owned()])
        );
        assert_eq!(created.status.unwrap().phase.as_deref(), Some("Active"));
        // An update without them keeps the finalizers and the status, as the API server does.
        let mut relabelled = namespace.clone();
        relabelled.metadata.labels = Some(BTreeMap::from([("team".into(), "x".into())]));
        relabelled.metadata.resource_version = created.metadata.resource_version.clone();
        let replaced = namespaces
            .replace("going", &PostParams::default(), &relabelled)
            .await
            .unwrap();
        assert_eq!(
            replaced.spec.unwrap().finalizers,
            Some(vec!["kubernetes".to_owned()])
        );
        assert_eq!(replaced.status.unwrap().phase.as_deref(), Some("Active"));
        let secrets: Api<Secret> = Api::namespaced(client.clone(), "going");
        let mut held = secret("held", &[]);
        held.metadata.finalizers = Some(vec!["example.com/hold".into()]);
        secrets.create(&PostParams::default(), &held).await.unwrap();
        let requests: Api<EmbedUrlRequest> = Api::namespaced(client.clone(), "going");
        requests
            .create(&PostParams::default(), &request("r", "u"))
            .await
            .unwrap();
        let elsewhere: Api<Secret> = Api::namespaced(client.clone(), "other");
        elsewhere
            .create(&PostParams::default(), &secret("kept", &[]))
            .await
            .unwrap();

        namespaces
            .delete("going", &DeleteParams::default())
            .await
            .unwrap();
        let terminating = namespaces.get("going").await.unwrap();
        assert!(terminating.metadata.deletion_timestamp.is_some());
        assert_eq!(
            terminating.status.unwrap().phase.as_deref(),
            Some("Terminating")
        );
        // NamespaceLifecycle: nothing new in it.
        let (code, _) = api_error(
            secrets
                .create(&PostParams::default(), &secret("new", &[]))
                .await
                .unwrap_err(),
        );
        assert_eq!(code, 403);
        eventually("the request deleted", || {
            server
                .get(
                    "embedurl.io/v1alpha1",
                    "embedurlrequests",
                    Some("going"),
                    "r",
                )
                .is_none()
        })
        .await;
        // The Secret's finalizer holds it, and it holds the namespace.
        let held = secrets.get("held").await.unwrap();
        assert!(held.metadata.deletion_timestamp.is_some());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(namespaces.get_opt("going").await.unwrap().is_some());
        secrets
            .patch(
                "held",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": null}})),
            )
            .await
            .unwrap();
        eventually("the namespace gone", || {
            server.get("v1", "namespaces", None, "going").is_none()
        })
        .await;
        assert!(elsewhere.get_opt("kept").await.unwrap().is_some());
    }

    #[tokio::test]
    async fn server_side_apply_tracks_field_owners() {
        let server = FakeApiServer::new();
        let secrets: Api<Secret> = Api::default_namespaced(server.client());
        let apply = |manager: &'static str, force: bool, data: Value| {
            let secrets = secrets.clone();
            let params = if force {
                PatchParams::apply(manager).force()
            } else {
                PatchParams::apply(manager)
            };
            let body = json!({
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "s"},
                "data": data,
            });
            async move { secrets.patch("s", &params, &Patch::Apply(body)).await }
        };
        let created = apply("alpha", false, json!({"a": "MQ==", "b": "Mg=="}))
            .await
            .unwrap();
        assert_eq!(created.metadata.generation, Some(1));
        let stored = server.get("v1", "secrets", Some("default"), "s").unwrap();
        let entries = &stored["metadata"]["managedFields"];
        assert_eq!(entries[0]["manager"], "alpha");
        assert_eq!(entries[0]["operation"], "Apply");
        assert_eq!(
            entries[0]["fieldsV1"],
            json!({"f:data": {"f:a": {}, "f:b": {}}})
        );

        let shrunk = apply("alpha", false, json!({"a": "MQ=="})).await.unwrap();
        assert_eq!(
            shrunk.data.as_ref().unwrap().keys().collect::<Vec<_>>(),
            ["a"]
        );
        let same = apply("alpha", false, json!({"a": "MQ=="})).await.unwrap();
        assert_eq!(same.resource_version(), shrunk.resource_version());

        let (code, reason) = api_error(
            apply("beta", false, json!({"a": "Mw=="}))
                .await
                .unwrap_err(),
        );
        assert_eq!((code, reason.as_str()), (409, "Conflict"));
        apply("beta", false, json!({"a": "MQ==", "c": "NA=="}))
            .await
            .expect("same value, new field: no conflict");
        let forced = apply("beta", true, json!({"a": "Mw==", "c": "NA=="}))
            .await
            .unwrap();
        assert_eq!(forced.data.unwrap()["a"].0, b"3");
        let alpha_fields = forced
            .metadata
            .managed_fields
            .unwrap()
            .into_iter()
            .find(|entry| entry.manager.as_deref() == Some("alpha"));
        assert!(alpha_fields.is_none(), "alpha lost its only field");

        // A merge patch takes ownership; applying over it then conflicts with that manager.
        let merge = Patch::Merge(json!({"data": {"c": "NQ=="}}));
        secrets
            .patch(
                "s",
                &PatchParams {
                    field_manager: Some("editor".to_owned()),
                    ..PatchParams::default()
                },
                &merge,
            )
            .await
            .unwrap();
        let error = apply("beta", false, json!({"a": "Mw==", "c": "NA=="}))
            .await
            .unwrap_err();
        assert!(
            error.to_string().contains("conflict with \"editor\""),
            "{error}"
        );
        let error = secrets
            .patch(
                "s",
                &PatchParams::default(),
                &Patch::Apply(json!({"data": {}})),
            )
            .await
            .unwrap_err();
        assert_eq!(api_error(error).0, 400, "apply needs a field manager");
    }

    #[tokio::test]
    async fn watcher_recovers_from_closed_watches_and_expired_history() {
        let server = FakeApiServer::new();
        let secrets: Api<Secret> = Api::default_namespaced(server.client());
        let (store, writer) = reflector::store();
        // Polled only inside `drive`, so the test decides when the watcher runs.
        let mut events = pin!(reflector(
            writer,
            watcher(secrets.clone(), watcher::Config::default())
        ));
        let mut drive = async |done: &dyn Fn() -> bool| {
            let mut errors = Vec::new();
            let poll = async {
                while !done() {
                    match events.next().await.expect("the watcher never ends") {
                        Ok(_) => {}
                        Err(error) => errors.push(error.to_string()),
                    }
                }
            };
            tokio::time::timeout(Duration::from_secs(3), poll)
                .await
                .expect("watcher did not converge");
            errors
        };

        secrets
            .create(&PostParams::default(), &secret("a", &[]))
            .await
            .unwrap();
        drive(&|| names(&store) == ["a"]).await;
        secrets
            .create(&PostParams::default(), &secret("b", &[]))
            .await
            .unwrap();
        secrets
            .patch(
                "b",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"v": "2"}}})),
            )
            .await
            .unwrap();
        drive(&|| {
            store
                .get(&reflector::ObjectRef::new("b").within("default"))
                .is_some_and(|b| b.labels().contains_key("v"))
        })
        .await;
        secrets.delete("a", &DeleteParams::default()).await.unwrap();
        drive(&|| names(&store) == ["b"]).await;

        // While the watcher is not polled: close its stream, write, and forget the history, so
        // that it can only resume through a 410 and a relist.
        let lists = server.request_count("list", "secrets");
        server.end_all_watches();
        secrets
            .create(&PostParams::default(), &secret("c", &[]))
            .await
            .unwrap();
        server.compact_history();
        let errors = drive(&|| names(&store) == ["b", "c"]).await;
        assert!(
            errors.iter().any(|error| error.contains("Expired")),
            "{errors:?}"
        );
        assert_eq!(server.request_count("list", "secrets"), lists + 1);
    }

    #[tokio::test]
    async fn bookmarks_come_periodically_and_before_the_timeout_at_the_latest_version() {
        let server = FakeApiServer::new();
        server.set_bookmark_interval(Duration::from_millis(400));
        server.register_kind(ResourceKind::namespaced("v1", "configmaps", "ConfigMap"));
        let secrets: Api<Secret> = Api::default_namespaced(server.client());
        let configmaps: Api<ConfigMap> = Api::default_namespaced(server.client());
        let made = AtomicUsize::new(0);
        let latest = async || {
            let mut configmap = ConfigMap::default();
            configmap.metadata.name = Some(format!("cm-{}", made.fetch_add(1, Ordering::Relaxed)));
            let created = configmaps
                .create(&PostParams::default(), &configmap)
                .await
                .unwrap();
            created.resource_version().unwrap()
        };
        let before = latest().await;
        let params = WatchParams::default().timeout(3);
        let mut events = pin!(secrets.watch(&params, &before).await.unwrap());
        let mut bookmarks = Vec::new();
        let mut last = before.clone();
        while let Some(event) = events.try_next().await.unwrap() {
            let WatchEvent::Bookmark(bookmark) = event else {
                panic!("only bookmarks expected: {event:?}")
            };
            bookmarks.push(bookmark.metadata.resource_version);
            // Changes the watch does not show move its bookmarks on.
            last = latest().await;
        }
        // Periodic ones at 0.4 s, 0.8 s (the next would be at 1.2 s, the last 2 s before the
        // 3 s timeout at 1 s): 3 in all, each at the version of the latest change before it.
        assert_eq!(bookmarks.len(), 3, "{bookmarks:?}");
        assert_eq!(bookmarks[0], before);
        assert!(bookmarks.windows(2).all(|w| w[0] < w[1]), "{bookmarks:?}");
        assert_ne!(
            bookmarks[2], last,
            "the change after the last bookmark is not in one"
        );

        // Not asked for, none come (two would have by now).
        let params = WatchParams::default().timeout(3).disable_bookmarks();
        let mut quiet = pin!(secrets.watch(&params, &last).await.unwrap());
        let first = tokio::time::timeout(Duration::from_millis(900), quiet.try_next()).await;
        assert!(first.is_err(), "{first:?}");
    }

    #[tokio::test]
    async fn a_watch_times_out_and_gets_bookmarks_while_changes_never_pause() {
        let server = FakeApiServer::new();
        server.set_bookmark_interval(Duration::from_millis(300));
        // Lagging: after each wait for a change's time, the next ones are already there.
        server.set_watch_delay(Duration::from_millis(50));
        server.register_kind(ResourceKind::namespaced("v1", "configmaps", "ConfigMap"));
        let secrets: Api<Secret> = Api::default_namespaced(server.client());
        let configmaps: Api<ConfigMap> = Api::default_namespaced(server.client());
        // Changes of another kind every few milliseconds, for longer than the watch lasts.
        let churn = tokio::spawn(async move {
            for i in 0.. {
                let mut configmap = ConfigMap::default();
                configmap.metadata.name = Some(format!("cm-{i}"));
                configmaps
                    .create(&PostParams::default(), &configmap)
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
        let started = Instant::now();
        let params = WatchParams::default().timeout(3);
        let mut events = pin!(secrets.watch(&params, "1").await.unwrap());
        let mut bookmarks = 0;
        while let Some(event) = tokio::time::timeout(Duration::from_secs(5), events.try_next())
            .await
            .expect("the watch ended at its timeout")
            .unwrap()
        {
            assert!(matches!(event, WatchEvent::Bookmark(_)), "{event:?}");
            bookmarks += 1;
        }
        churn.abort();
        assert!(started.elapsed() < Duration::from_millis(3500));
        // Every 0.3 s until 2 s before the timeout.
        assert!(bookmarks >= 2, "{bookmarks} bookmarks");
    }

    #[tokio::test]
    async fn a_quiet_watch_with_bookmarks_resumes_past_a_compaction_without_relisting() {
        let server = FakeApiServer::new();
        server.set_bookmark_interval(Duration::from_millis(100));
        let secrets: Api<Secret> = Api::default_namespaced(server.client());
        let labelled = watcher::Config::default().labels("app=shown");
        let (store, writer) = reflector::store();
        let mut events = pin!(reflector(writer, watcher(secrets.clone(), labelled)));
        secrets
            .create(&PostParams::default(), &secret("a", &[("app", "shown")]))
            .await
            .unwrap();
        let listed = async {
            while names(&store) != ["a"] {
                events.next().await.unwrap().unwrap();
            }
        };
        tokio::time::timeout(Duration::from_secs(3), listed)
            .await
            .unwrap();
        // Writes the watch does not show, then a bookmark past them, then a compaction.
        for name in ["b", "c"] {
            secrets
                .create(&PostParams::default(), &secret(name, &[]))
                .await
                .unwrap();
        }
        let lists = server.request_count("list", "secrets");
        let bookmarked = async {
            loop {
                if let watcher::Event::Apply(_) = events.next().await.unwrap().unwrap() {
                    panic!("nothing to show")
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_millis(300), bookmarked).await;
        server.compact_history();
        server.end_all_watches();
        let watches = server.request_count("watch", "secrets");
        let resumed = async {
            while server.request_count("watch", "secrets") == watches {
                let _ = tokio::time::timeout(Duration::from_millis(50), events.next()).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(3), resumed)
            .await
            .unwrap();
        // Give a 410 the time to come back and cause a relist: none does.
        let _ = tokio::time::timeout(Duration::from_millis(300), events.next()).await;
        assert_eq!(server.request_count("list", "secrets"), lists, "no relist");
        assert_eq!(names(&store), ["a"]);
    }

    #[tokio::test]
    async fn observers_see_every_change_and_history_limit_expires_older_versions() {
        let server = FakeApiServer::new();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        server.observe(move |change| {
            let name = change.after.or(change.before).unwrap()["metadata"]["name"].clone();
            log.lock().unwrap().push((
                change.kind.plural,
                name,
                change.before.is_some(),
                change.after.is_some(),
                change.resource_version,
            ));
        });
        server.set_history_limit(2);
        let secrets: Api<Secret> = Api::default_namespaced(server.client());
        let mut versions = Vec::new();
        for name in ["a", "b", "c", "d"] {
            let created = secrets
                .create(&PostParams::default(), &secret(name, &[]))
                .await
                .unwrap();
            versions.push(created.resource_version().unwrap());
        }
        secrets.delete("a", &DeleteParams::default()).await.unwrap();

        let seen = seen.lock().unwrap().clone();
        let kinds: Vec<_> = seen
            .iter()
            .map(|(p, n, b, a, _)| (*p, n.clone(), *b, *a))
            .collect();
        assert_eq!(
            kinds,
            [
                ("secrets", json!("a"), false, true),
                ("secrets", json!("b"), false, true),
                ("secrets", json!("c"), false, true),
                ("secrets", json!("d"), false, true),
                ("secrets", json!("a"), true, false),
            ]
        );
        assert!(seen.windows(2).all(|w| w[0].4 < w[1].4));

        // Only the last two changes (d created, a deleted) are kept: a watch from c's version
        // resumes with them, one from b's version has expired.
        let params = WatchParams::default().timeout(1);
        let resumed: Vec<_> = secrets
            .watch(&params, &versions[2])
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        let resumed: Vec<String> = resumed
            .iter()
            .map(|event| match event {
                WatchEvent::Added(s) => format!("added {}", s.name_any()),
                WatchEvent::Deleted(s) => format!("deleted {}", s.name_any()),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(resumed, ["added d", "deleted a"]);
        let expired: Vec<_> = secrets
            .watch(&params, &versions[1])
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert!(
            matches!(&expired[..], [WatchEvent::Error(e)] if e.code == 410),
            "{expired:?}"
        );
    }

    struct Context {
        client: kube::Client,
        reconciles: AtomicUsize,
    }

    async fn reconcile(
        request: Arc<EmbedUrlRequest>,
        context: Arc<Context>,
    ) -> Result<Action, kube::Error> {
        context.reconciles.fetch_add(1, Ordering::SeqCst);
        let namespace = request.namespace().unwrap_or_default();
        let secret_name = format!("{}-url", request.name_any());
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(secret_name.clone()),
                owner_references: request.controller_owner_ref(&()).map(|owner| vec![owner]),
                ..ObjectMeta::default()
            },
            string_data: Some(BTreeMap::from([(
                "url".to_owned(),
                request.spec.url.clone(),
            )])),
            ..Secret::default()
        };
        let params = PatchParams::apply("test-operator").force();
        let secrets: Api<Secret> = Api::namespaced(context.client.clone(), &namespace);
        secrets
            .patch(&secret_name, &params, &Patch::Apply(&secret))
            .await?;
        let status = json!({
            "apiVersion": "embedurl.io/v1alpha1",
            "kind": "EmbedUrlRequest",
            "status": {"secretName": secret_name},
        });
        let requests: Api<EmbedUrlRequest> = Api::namespaced(context.client.clone(), &namespace);
        requests
            .patch_status(&request.name_any(), &params, &Patch::Apply(status))
            .await?;
        Ok(Action::await_change())
    }

    fn error_policy(_: Arc<EmbedUrlRequest>, _: &kube::Error, _: Arc<Context>) -> Action {
        Action::requeue(Duration::from_millis(100))
    }

    #[tokio::test]
    async fn controller_settles_and_owned_secret_is_collected() {
        let server = FakeApiServer::new();
        let client = server.client();
        let requests: Api<EmbedUrlRequest> = Api::default_namespaced(client.clone());
        let context = Arc::new(Context {
            client: client.clone(),
            reconciles: AtomicUsize::new(0),
        });
        let controller = Controller::new(requests.clone(), watcher::Config::default())
            .owns(
                Api::<Secret>::default_namespaced(client),
                watcher::Config::default(),
            )
            .run(reconcile, error_policy, context.clone())
            .for_each(|_| async {});
        let controller = tokio::spawn(controller);

        let created = requests
            .create(&PostParams::default(), &request("dash", "https://a"))
            .await
            .unwrap();
        eventually("the owned Secret", || {
            server
                .get("v1", "secrets", Some("default"), "dash-url")
                .is_some()
        })
        .await;
        // Settled: no reconcile for 300 ms. Every later reconcile writes nothing new, so no watch
        // event triggers another one.
        let mut seen = context.reconciles.load(Ordering::SeqCst);
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let now = context.reconciles.load(Ordering::SeqCst);
            if now == seen {
                break;
            }
            seen = now;
        }
        assert!((1..=4).contains(&seen), "{seen} reconciles");
        assert_eq!(server.effective_write_count("secrets"), 1);
        assert_eq!(
            server.effective_write_count("embedurlrequests"),
            2,
            "create and one status write"
        );
        let stored = server
            .get("v1", "secrets", Some("default"), "dash-url")
            .unwrap();
        assert_eq!(
            stored["metadata"]["ownerReferences"][0]["uid"],
            json!(created.uid())
        );
        assert_eq!(stored["data"]["url"], "aHR0cHM6Ly9h");
        let status = server
            .get(
                "embedurl.io/v1alpha1",
                "embedurlrequests",
                Some("default"),
                "dash",
            )
            .unwrap()["status"]
            .clone();
        assert_eq!(status, json!({"secretName": "dash-url"}));

        requests
            .delete("dash", &DeleteParams::default())
            .await
            .unwrap();
        eventually("garbage collection", || {
            server
                .get("v1", "secrets", Some("default"), "dash-url")
                .is_none()
        })
        .await;
        controller.abort();
    }

    #[tokio::test]
    async fn serves_http_for_a_kubeconfig_client() {
        let server = FakeApiServer::new();
        let address = server.serve_http().await;
        let kubeconfig = Kubeconfig::from_yaml(&FakeApiServer::kubeconfig_yaml(address)).unwrap();
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .unwrap();
        let secrets: Api<Secret> = Api::default_namespaced(kube::Client::try_from(config).unwrap());
        secrets
            .create(&PostParams::default(), &secret("a", &[]))
            .await
            .unwrap();

        let (store, writer) = reflector::store();
        let streaming = watcher::Config::default().streaming_lists();
        let watch = tokio::spawn(
            reflector(writer, watcher(secrets.clone(), streaming)).for_each(|_| async {}),
        );
        eventually("the initial events", || names(&store) == ["a"]).await;
        secrets
            .create(&PostParams::default(), &secret("b", &[]))
            .await
            .unwrap();
        eventually("a live event over HTTP", || names(&store) == ["a", "b"]).await;
        assert_eq!(
            server.request_count("list", "secrets"),
            0,
            "a streaming list needs no list"
        );
        watch.abort();
    }

    #[tokio::test]
    async fn watch_label_selector_follows_relabelling() {
        let server = FakeApiServer::new();
        let secrets: Api<Secret> = Api::default_namespaced(server.client());
        secrets
            .create(&PostParams::default(), &secret("x", &[("app", "web")]))
            .await
            .unwrap();
        let mut events = secrets
            .watch(&WatchParams::default().labels("app=web"), "0")
            .await
            .unwrap()
            .boxed();
        let mut next = async || match events.try_next().await.unwrap().expect("an event") {
            WatchEvent::Added(secret) => ("ADDED", secret.name_any()),
            WatchEvent::Modified(secret) => ("MODIFIED", secret.name_any()),
            WatchEvent::Deleted(secret) => ("DELETED", secret.name_any()),
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(next().await, ("ADDED", "x".to_owned()));
        let relabel = |app: &str| Patch::Merge(json!({"metadata": {"labels": {"app": app}}}));
        secrets
            .patch("x", &PatchParams::default(), &relabel("db"))
            .await
            .unwrap();
        assert_eq!(next().await, ("DELETED", "x".to_owned()));
        secrets
            .create(&PostParams::default(), &secret("y", &[("app", "db")]))
            .await
            .unwrap();
        secrets
            .patch("x", &PatchParams::default(), &relabel("web"))
            .await
            .unwrap();
        assert_eq!(next().await, ("ADDED", "x".to_owned()), "y never matched");
        secrets
            .patch(
                "x",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": {"a": "b"}}})),
            )
            .await
            .unwrap();
        assert_eq!(next().await, ("MODIFIED", "x".to_owned()));

        // A metadata-only watch from the current resourceVersion sees only later changes.
        let version = secrets.get("x").await.unwrap().resource_version().unwrap();
        let mut metadata = secrets
            .watch_metadata(&WatchParams::default(), &version)
            .await
            .unwrap()
            .boxed();
        secrets.delete("y", &DeleteParams::default()).await.unwrap();
        match metadata.try_next().await.unwrap() {
            Some(WatchEvent::Deleted(object)) => {
                assert_eq!(object.types.unwrap().kind, "PartialObjectMetadata");
                assert_eq!(object.metadata.name.as_deref(), Some("y"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn injected_failures_then_normal_service() {
        let server = FakeApiServer::new();
        let secrets: Api<Secret> = Api::default_namespaced(server.client());
        server.inject_failure("create", "secrets", 409, 2);
        for _ in 0..2 {
            let (code, reason) = api_error(
                secrets
                    .create(&PostParams::default(), &secret("a", &[]))
                    .await
                    .unwrap_err(),
            );
            assert_eq!((code, reason.as_str()), (409, "Conflict"));
        }
        secrets
            .create(&PostParams::default(), &secret("a", &[]))
            .await
            .unwrap();
        server.inject_failure("*", "secrets", 500, 1);
        let (code, reason) = api_error(secrets.get("a").await.unwrap_err());
        assert_eq!((code, reason.as_str()), (500, "InternalError"));
        secrets.get("a").await.unwrap();
        assert_eq!(server.request_count("create", "secrets"), 3);
        assert_eq!(server.effective_write_count("secrets"), 1);

        server.inject_failure("list", "secrets", 429, 1);
        let response = server
            .router()
            .oneshot(
                http::Request::get("/api/v1/namespaces/default/secrets")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    }
}
