//! The reconcile of one `EmbedUrlRequest`: read what the cluster holds, plan, mint if due, write.
//!
//! A reconcile that finds nothing to do makes no AWS call and no write: the plan comes from
//! [`crate::schedule`], and the status is only written when it differs from what is stored, so
//! the echoes of the operator's own writes settle at once.

use crate::crd::{
    CachedRequest, EmbedUrlRequest, EmbedUrlRequestSpec, EmbedUrlRequestStatus, READY_CONDITION,
};
use crate::error::{Error, Result};
use crate::events::Reporter;
use crate::identity::{AwsClients, Identity};
use crate::policy::{self, Ask, Decision, EmbedUrlPolicy, PolicyMode};
use crate::providers::AwsErrorKind;
use crate::ratelimit::{BucketKey, RateLimits};
use crate::schedule::{self, Facts, MintReason, Plan};
use crate::secret::{self, StoredSecret, StoredUrl};
use crate::secret_cache::{Lookup, SecretCache};
use crate::secret_writer::{SecretWritten, apply_secret_content, read_secret, restore_metadata};
use crate::status::{
    RateLimitWait, conflict_status, failed_status, failure_reason, invalid_spec_status,
    minted_status, not_permitted_status, ready_again, refresh_request, secret_refused_status,
    suspended_status, with_rate_limit,
};
use crate::status_writer::{
    apply_status_of, publish_schedule, publish_transition, replace_status, write_status,
};
use crate::telemetry::Metrics;
use crate::validation::{self, InvalidSpec, UseByWindows, ValidSpec};
use crate::work_queue::{RequestKey, Running, WorkQueue};
use compact_str::CompactString;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DynamicObject, ListParams};
use kube::core::{ApiResource, PartialObjectMeta, error_boundary::InvalidObject};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::time::Instant;
use tracing::{Instrument, debug, debug_span, info, warn};

/// How often a request blocked by a foreign Secret checks whether the Secret is gone. The
/// operator does not watch Secrets it does not own, so it has to look.
pub const CONFLICT_RECHECK: Duration = Duration::from_secs(60);

/// Operator-wide settings a reconcile needs.
#[derive(Clone, Debug)]
pub struct Settings {
    pub windows: UseByWindows,
    /// The operator's own AWS region, used when neither a request nor its policy names one.
    pub default_region: Option<String>,
    pub policy_mode: PolicyMode,
}

/// Shared state of every reconcile.
pub struct Context {
    pub client: kube::Client,
    pub aws: Arc<AwsClients>,
    pub settings: Settings,
    /// Who events are reported by.
    pub reporter: Reporter,
    /// What is known of the Secrets the operator owns (label-selected, no data), filled by the
    /// controller's watch and by the operator's own reads and writes.
    pub secrets: Arc<SecretCache>,
    /// The requests this controller serves, as the watch last showed them.
    pub requests: Store<CachedRequest>,
    /// Cache of every EmbedUrlPolicy.
    pub policies: Store<EmbedUrlPolicy>,
    /// Cache of the watched namespaces' metadata (their labels select policies).
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    /// True once the policy cache (shared by every controller of the process) has listed.
    pub policies_listed: Arc<AtomicBool>,
    /// True once this controller's namespace cache has listed.
    pub namespaces_listed: Arc<AtomicBool>,
    /// What is reconciled next, and when, across every controller of this process.
    pub queue: Arc<WorkQueue>,
    /// Paces the AWS calls per (service, region, identity), most urgent first.
    pub rate_limits: Arc<RateLimits>,
    pub metrics: Arc<Metrics>,
    /// Consecutive failed reconciles per request, for the retry backoff.
    pub failures: Arc<FailureCounts>,
}

/// Consecutive failed reconciles per request (namespace, name). Only failing requests have an
/// entry: it goes on the next success, or when the request is deleted.
#[derive(Default)]
pub struct FailureCounts(std::sync::Mutex<std::collections::HashMap<(String, String), u32>>);

impl FailureCounts {
    fn record_failure(&self, namespace: &str, name: &str) -> u32 {
        let mut counts = self.lock();
        let count = counts
            .entry((namespace.to_string(), name.to_string()))
            .or_insert(0);
        *count = count.saturating_add(1);
        *count
    }

    /// Keeps the counts only of the requests `exists` says are still there, among those whose
    /// namespace is `in_scope` (after a relist, for deletions its watch never reported).
    pub fn retain(&self, in_scope: impl Fn(&str) -> bool, exists: impl Fn(&str, &str) -> bool) {
        self.lock()
            .retain(|(namespace, name), _| !in_scope(namespace) || exists(namespace, name));
    }

    #[cfg(test)]
    fn count(&self, namespace: &str, name: &str) -> Option<u32> {
        self.lock()
            .get(&(namespace.to_string(), name.to_string()))
            .copied()
    }

    pub fn forget(&self, namespace: &str, name: &str) {
        let mut counts = self.lock();
        if !counts.is_empty() {
            counts.remove(&(namespace.to_string(), name.to_string()));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<(String, String), u32>> {
        // Plain counters: still usable after a panic elsewhere.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// How long to wait after the `failures`-th consecutive failed reconcile. Retryable errors
/// (conflicts, throttling, API server errors) are retried after 5 s three times, then back off,
/// doubling up to a minute: a failed Secret write throws away the URL just minted, so during an
/// API server outage a fixed 5 s would mint and lose a URL per request every 5 s.
fn api_retry_delay(retryable: bool, failures: u32) -> Duration {
    if !retryable {
        return Duration::from_secs(60);
    }
    let doublings = failures.saturating_sub(3).min(4);
    (Duration::from_secs(5) * (1 << doublings)).min(Duration::from_secs(60))
}

/// [`api_retry_delay`] with jitter (`jitter`, 0 to 1, adds up to 20 %), and for a retryable
/// error never past half the time the current URL has left (`url_left`), at least a second: a
/// refresh whose Secret write failed must be tried again before that URL lapses, and with a
/// short `refreshBefore` a fixed 5 s would come too late. Halving leaves time for more tries.
fn retry_delay_after_api_error(
    retryable: bool,
    failures: u32,
    url_left: Option<Duration>,
    jitter: f64,
) -> Duration {
    let delay = api_retry_delay(retryable, failures).mul_f64(1.0 + 0.2 * jitter.clamp(0.0, 1.0));
    match url_left {
        Some(left) if retryable => delay.min((left / 2).max(Duration::from_secs(1))),
        _ => delay,
    }
}

/// Reconciles one request, as [`WorkQueue`] started it (`running` holds its slot until this
/// ends): dispatches readable and unreadable objects, then puts the request back in the queue
/// for its next refresh or check, or for a retry after a failure.
pub async fn reconcile(object: Arc<CachedRequest>, ctx: Arc<Context>, running: Running) {
    let key = running.key();
    let timer = ctx.metrics.reconcile_started();
    // The operator's own lines name the request at every level; this span makes the lines the
    // libraries log meanwhile (the AWS SDK's, kube's) name it too, once `debug` is on. At
    // `info` its callsite is disabled, so it costs nothing on the refresh path.
    let span = debug_span!("request", namespace = &*key.namespace, name = &*key.name);
    let result = async {
        match &object.0 {
            Ok(request) => reconcile_request(request, &ctx).await,
            Err(invalid) => reconcile_unreadable(invalid, &ctx).await,
        }
    }
    .instrument(span)
    .await;
    timer.finish(result.as_ref().err().map(Error::metric_label));
    match result {
        Ok(Next(after)) => {
            ctx.failures.forget(&key.namespace, &key.name);
            if let Some(after) = after {
                running.reschedule(Instant::now() + after);
            }
        }
        Err(error) => retry_after_failure(&object, &running, &error, &ctx),
    }
    // Deleted while this reconcile ran: the deletion's clean-up may have come before what the
    // reconcile just recorded (a failure count, the request's metric series), which would then
    // outlive the request until the next relist, its series perhaps firing an expiry alert.
    // The watch reports a deletion to the queue (`forgotten`) before its own clean-up, and a
    // relist replaces the cache before it drops what it no longer shows: a deletion seen after
    // this check cleans up after these records itself.
    if running.forgotten() || still_cached(key, object.meta().uid.as_deref(), &ctx).is_none() {
        ctx.failures.forget(&key.namespace, &key.name);
        ctx.metrics.forget_request(&key.namespace, &key.name);
    }
}

/// When the URL in the request's Secret stops working, as its status says (the use-by time of
/// the last mint, written with the Secret); now if it has none, or the request cannot be read.
/// Orders the requests that are due when there are more than slots: earliest first.
pub fn urgency(object: &CachedRequest) -> Timestamp {
    let status = object.0.as_ref().ok().and_then(|r| r.status.as_ref());
    status
        .and_then(|s| schedule::parse_time(s.url_expires_at.as_deref()))
        .unwrap_or_else(Timestamp::now)
}

/// A mint's place in the rate limit's queue: the URL that stops working first goes first, by the
/// use-by time the status gives for the URL the operator last wrote (as the work queue orders
/// them, see [`urgency`]). Not by the Secret's `expiresAt`: the request's owner can edit that, or
/// delete the Secret, and so jump ahead of every other tenant. Only a request that was never
/// given a URL is as urgent as can be.
fn mint_urgency(current: &EmbedUrlRequestStatus, usable: Option<&StoredUrl>) -> Timestamp {
    let now = Timestamp::now();
    // Before the first status write, the Secret's time; never earlier than now, so a Secret's
    // edited `expiresAt` cannot put a request ahead of one never given a URL.
    schedule::parse_time(current.url_expires_at.as_deref())
        .or(usable.map(|url| url.expires_at.max(now)))
        .unwrap_or(now)
}

/// When to reconcile a request again if nothing changes first (`None`: only on a change).
#[derive(Debug, PartialEq, Eq)]
struct Next(Option<Duration>);

impl Next {
    fn requeue(after: Duration) -> Self {
        Next(Some(after))
    }

    fn await_change() -> Self {
        Next(None)
    }
}

/// After a failed reconcile: retry soon when that can help.
fn retry_after_failure(object: &CachedRequest, running: &Running, error: &Error, ctx: &Context) {
    let key = running.key();
    let failures = ctx.failures.record_failure(&key.namespace, &key.name);
    // What the status says the current URL has left (the Secret still holds it).
    let now = Timestamp::now();
    let url_left = object
        .0
        .as_ref()
        .ok()
        .and_then(|request| request.status.as_ref())
        .and_then(|status| schedule::parse_time(status.url_expires_at.as_deref()))
        .filter(|expires| *expires > now)
        .map(|expires| expires.duration_since(now).unsigned_abs());
    let delay = retry_delay_after_api_error(
        error.is_retryable(),
        failures,
        url_left,
        rand::random::<f64>(),
    );
    warn!(
        namespace = &*key.namespace,
        name = &*key.name,
        error = %error,
        retry_in_secs = delay.as_secs(),
        "reconcile failed"
    );
    running.reschedule(Instant::now() + delay);
}

async fn reconcile_request(request: &EmbedUrlRequest, ctx: &Context) -> Result<Next> {
    if request.meta().deletion_timestamp.is_some() {
        // Going away, but still visible while finalizers or a foreground deletion hold it (the
        // garbage collector deletes its Secret first). A URL minted now would only re-create a
        // Secret the collector then removes again; and its series would keep an expiry alert
        // firing for a request that is going away.
        let key = RequestKey::of(request);
        ctx.metrics.forget_request(&key.namespace, &key.name);
        return Ok(Next::await_change());
    }
    let now = Timestamp::now();
    let current = request.status.clone().unwrap_or_default();
    let spec = match validation::validate(&request.spec, &request.name_any(), &ctx.settings.windows)
    {
        Ok(spec) => spec,
        Err(invalid) => {
            let desired = invalid_spec_status(&current, request.meta().generation, &invalid, now);
            write_status(request, &current, desired, ctx).await?;
            return Ok(Next::await_change());
        }
    };

    // Deciding before both caches have listed would deny requests that a policy allows.
    if !(ctx.policies_listed.load(Ordering::Acquire)
        && ctx.namespaces_listed.load(Ordering::Acquire))
    {
        return Ok(Next::requeue(Duration::from_secs(1)));
    }
    let namespace = request.namespace().unwrap_or_default();
    let served = match authorize(&namespace, &spec, ctx) {
        Ok(served) => served,
        Err(Refusal::NotPermitted(message)) => {
            let desired = not_permitted_status(&current, request, &spec, &message, now);
            write_status(request, &current, desired, ctx).await?;
            return Ok(Next::await_change());
        }
        Err(Refusal::Invalid(invalid)) => {
            let desired = invalid_spec_status(&current, request.meta().generation, &invalid, now);
            write_status(request, &current, desired, ctx).await?;
            return Ok(Next::await_change());
        }
    };

    let uid = request.uid().unwrap_or_default();
    let request_name = request.name_any();
    let owner = secret::Owner {
        uid: &uid,
        name: &request_name,
    };
    let stored = match ctx.secrets.get(&namespace, &spec.secret_name) {
        Lookup::Known(snapshot) => {
            let stored = secret::inspect(Some(&snapshot), owner, &spec.secret_template);
            // Another replica may have written since (the watch has not told yet): an older
            // URL than the status says was written means read it again before acting on it.
            let status_expiry = schedule::parse_time(current.url_expires_at.as_deref());
            match &stored {
                StoredSecret::Owned { url: Some(url) }
                    if status_expiry.is_some_and(|s| s > url.expires_at) =>
                {
                    read_secret(ctx, &namespace, &spec.secret_name, owner, &spec).await?
                }
                _ => stored,
            }
        }
        // Not cached (new, not labelled by the operator, or changed by someone else): read it.
        Lookup::Unknown => read_secret(ctx, &namespace, &spec.secret_name, owner, &spec).await?,
    };

    if stored == StoredSecret::Missing && namespace_terminating(request, &current, &spec, ctx).await
    {
        // The namespace controller is deleting everything in it, Secrets possibly before this
        // request, and the API server creates nothing new there (an existing Secret can still
        // be refreshed). A URL minted now could not be written, and would take a token that
        // other requests of its bucket need.
        return Ok(namespace_going_away(request, ctx));
    }

    if spec.suspend {
        let desired = served.stamp(suspended_status(&current, request, &spec, &stored, now));
        write_status(request, &current, desired, ctx).await?;
        return Ok(Next::await_change());
    }

    let usable = match &stored {
        StoredSecret::Owned { url: Some(url) } => Some(url.clone()),
        _ => None,
    };
    let facts = Facts {
        now,
        generation: request.meta().generation,
        refresh_request: refresh_request(request),
        status: &current,
        stored: usable.as_ref(),
        refresh_before: spec.refresh_before,
        window: ctx.settings.windows.for_service(spec.service()),
    };
    match schedule::plan(&facts) {
        Plan::Wait { until } => {
            let mut restored = None;
            if usable.as_ref().is_some_and(|url| !url.metadata_intact) {
                // Labels or template metadata were edited by hand: restore them with the same
                // URL, without asking AWS for a new one. The cache holds no URL: read it.
                restored = match restore_metadata(ctx, request, &spec, owner).await {
                    // Deleted meanwhile by the namespace controller (the apply became a create).
                    Err(error) if error.is_namespace_terminating() => {
                        return Ok(namespace_going_away(request, ctx));
                    }
                    restored => restored?,
                };
            }
            let waiting =
                waiting_status(request, &current, &spec, usable.as_ref(), until, ctx).await?;
            let desired = match waiting {
                Waiting::Repair(repaired) => *repaired,
                // Nothing to repair: still record a change of policy, and a Ready condition
                // that a policy change (which bumps no generation) has made true again.
                Waiting::UpToDate => ready_again(request, &current, &spec, usable.as_ref(), now),
                // A status computed from the stale copy would undo the newer one (apply drops
                // the fields it leaves out); the newer one's watch event reconciles again.
                Waiting::StaleCache => return Ok(requeue_at(now, until)),
            };
            let desired = served.stamp(desired);
            write_status(request, &current, desired, ctx).await?;
            Ok(match restored {
                Some(written) => after_write(&written, now, until),
                None => requeue_at(now, until),
            })
        }
        Plan::Mint(reason) => {
            if let StoredSecret::Foreign { controller } = &stored {
                let desired = served.stamp(conflict_status(
                    &current,
                    request,
                    &spec,
                    controller.as_deref(),
                    now,
                ));
                write_status(request, &current, desired, ctx).await?;
                return Ok(Next::requeue(CONFLICT_RECHECK));
            }
            mint(
                request,
                &current,
                &spec,
                &served,
                usable.as_ref(),
                reason,
                ctx,
            )
            .await
        }
    }
}

/// Calls AWS, writes the Secret, then the status. The Secret goes first: a status that claims a
/// URL the Secret does not hold would be worse than a status that lags behind the Secret, which
/// the next reconcile repairs from the Secret (see [`schedule::plan`]).
async fn mint(
    request: &EmbedUrlRequest,
    current: &EmbedUrlRequestStatus,
    spec: &ValidSpec,
    served: &Served,
    usable: Option<&StoredUrl>,
    reason: MintReason,
    ctx: &Context,
) -> Result<Next> {
    let service = spec.service();
    let window = ctx.settings.windows.for_service(service);
    let planned = schedule::parse_time(current.next_refresh_time.as_deref());
    let rate_limit_wait;
    let result = {
        let bucket = BucketKey {
            service,
            region: served.region.clone(),
            identity: served
                .identity
                .assumed
                .as_ref()
                .map(|role| role.role_arn().to_string())
                .unwrap_or_default(),
        };
        let urgency = mint_urgency(current, usable);
        let granted = match ctx
            .rate_limits
            .acquire(&bucket, urgency, || ctx.queue.park())
            .await
        {
            Ok(granted) => granted,
            Err(turned_away) => {
                // The line is full of more urgent requests: wait in the work queue, without a
                // slot, until it has room. Nothing was called or written.
                debug!(
                    namespace = request.namespace().as_deref().unwrap_or_default(),
                    name = request.name_any(),
                    "turned away by a full rate-limit line"
                );
                ctx.queue.block(
                    &RequestKey::of(request),
                    bucket.id(),
                    urgency.as_millisecond(),
                    turned_away.retry_after,
                    ctx.rate_limits.token_interval(),
                );
                return Ok(Next::await_change());
            }
        };
        if granted.from_line {
            ctx.queue.release_blocked(bucket.id());
            if !still_the_same_request(request, ctx) {
                // Deleted while it waited its turn (perhaps created again under its name, with
                // a Secret this reconcile would take for its predecessor's): nothing to mint,
                // and the token goes to the next in line.
                ctx.rate_limits.refund(&bucket);
                return Ok(Next::await_change());
            }
        }
        ctx.metrics.observe_rate_limit_wait(service, granted.waited);
        let started = Timestamp::now();
        rate_limit_wait = RateLimitWait {
            waited: granted.waited,
            waited_in_line: granted.from_line,
            // From the planned refresh (or the retry) on; for a first URL, from the request's
            // creation.
            late_by: planned
                .or_else(|| {
                    current.url_expires_at.is_none().then(|| {
                        request
                            .meta()
                            .creation_timestamp
                            .as_ref()
                            .map(|created| created.0)
                    })?
                })
                .filter(|planned| *planned < started)
                .map(|planned| started.duration_since(planned).unsigned_abs())
                .unwrap_or(granted.waited)
                .max(granted.waited),
            rate: ctx.rate_limits.rate(),
            burst: ctx.rate_limits.burst(),
        };
        let timer = ctx.metrics.aws_call_started(service);
        let result = match &served.identity.assumed {
            // Resolve an assumed role first, so that an STS failure is reported as one.
            Some(role) => role.credentials().await.map(|_| ()),
            None => Ok(()),
        };
        let result = match result {
            Ok(()) => {
                served
                    .identity
                    .providers
                    .for_service(service)
                    .mint(&spec.target, &served.region)
                    .await
            }
            Err(error) => Err(error),
        };
        timer.finish(result.as_ref().err());
        result.map(|url| (url, started))
    };
    let namespace = request.namespace().unwrap_or_default();
    let name = request.name_any();
    match result {
        Ok((url, minted_at)) => {
            let expires_at = schedule::url_expires_at(minted_at, window);
            let next =
                schedule::planned_refresh(expires_at, spec.refresh_before, window, rand::random());
            let written = match apply_secret_content(
                ctx,
                request,
                spec,
                &url,
                expires_at,
                schedule::add(minted_at, spec.target.session_length()),
            )
            .await
            {
                Ok(written) => written,
                // The namespace is being deleted, and the namespace watch has not said so yet
                // (its deletion of the Secret came first, on another watch). The URL is lost
                // either way; a `SecretWriteFailed` status and warning for a request about to go
                // would only alarm, and a retry would mint again for nothing.
                Err(error) if error.is_namespace_terminating() => {
                    debug!(
                        namespace = &*namespace,
                        name = &*name,
                        "namespace is being deleted; the minted URL was discarded"
                    );
                    return Ok(namespace_going_away(request, ctx));
                }
                // Retrying soon mints another URL for the same refusal: back off instead.
                Err(error) if !error.is_retryable() => {
                    let refused = SecretRefusal {
                        error: &error,
                        rate_limit_wait,
                    };
                    return secret_refused(request, current, spec, served, refused, ctx).await;
                }
                Err(error) => return Err(error),
            };
            let minted = minted_status(request, current, spec, minted_at, expires_at, next);
            let desired = after_attempt(
                served,
                minted,
                request,
                current,
                spec,
                rate_limit_wait,
                minted_at,
            );
            write_status(request, current, desired, ctx).await?;
            if reason == MintReason::Due
                && let Some(planned) = planned
            {
                ctx.metrics.observe_refresh_lateness(minted_at, planned);
            }
            // A routine refresh happens every few minutes for every request: at 10,000 requests
            // that would be ~70 lines a second at info, for what the refresh metrics already
            // count. The first URL, a new spec, a requested refresh and a recovery stay at info.
            let routine = reason.is_routine(current.consecutive_failures.unwrap_or(0));
            macro_rules! log_minted {
                ($level:ident) => {
                    $level!(
                        namespace,
                        name,
                        service = service.name(),
                        reason = reason.as_str(),
                        url_expires_at = %secret::rfc3339(expires_at),
                        next_refresh = %secret::rfc3339(next),
                        "minted URL"
                    )
                };
            }
            if routine {
                log_minted!(debug);
            } else {
                log_minted!(info);
            }
            Ok(after_write(&written, Timestamp::now(), next))
        }
        Err(error) => {
            let now = Timestamp::now();
            let failures = current.consecutive_failures.unwrap_or(0).saturating_add(1);
            let still_usable_until = usable.map(|u| u.expires_at).filter(|e| *e > now);
            let retry = schedule::retry_at(
                now,
                error.kind,
                failures,
                still_usable_until,
                window,
                rand::random(),
            );
            warn!(
                namespace,
                name,
                service = service.name(),
                reason = failure_reason(&error),
                operation = error.operation,
                aws_error = %error.code,
                failures,
                retry_at = %secret::rfc3339(retry),
                "AWS call failed"
            );
            let failed = failed_status(
                request,
                current,
                spec,
                &error,
                failures,
                still_usable_until,
                retry,
                now,
            );
            let desired =
                after_attempt(served, failed, request, current, spec, rate_limit_wait, now);
            write_status(request, current, desired, ctx).await?;
            Ok(requeue_at(now, retry))
        }
    }
}

/// The API server refused the Secret a URL was just minted for (403 from RBAC, or an admission
/// policy): the request says so and waits like a request AWS rejected, instead of minting and
/// losing a URL every minute.
async fn secret_refused(
    request: &EmbedUrlRequest,
    current: &EmbedUrlRequestStatus,
    spec: &ValidSpec,
    served: &Served,
    SecretRefusal {
        error,
        rate_limit_wait,
    }: SecretRefusal<'_>,
    ctx: &Context,
) -> Result<Next> {
    // The reconcile ends well (the status says what happened), but did not do its work.
    ctx.metrics.count_reconcile_error("secret_refused");
    let now = Timestamp::now();
    let failures = current.consecutive_failures.unwrap_or(0).saturating_add(1);
    let window = ctx.settings.windows.for_service(spec.service());
    let retry = schedule::retry_at(
        now,
        AwsErrorKind::Rejected,
        failures,
        None,
        window,
        rand::random(),
    );
    // The URL is already out of the API server's message (see `redact_url`).
    let refusal = error.refusal();
    warn!(
        namespace = request.namespace().unwrap_or_default(),
        name = request.name_any(),
        secret = &*spec.secret_name,
        refusal,
        failures,
        retry_at = %secret::rfc3339(retry),
        "Secret write refused; the minted URL was discarded"
    );
    let refused = secret_refused_status(request, current, spec, &refusal, failures, retry, now);
    let desired = after_attempt(
        served,
        refused,
        request,
        current,
        spec,
        rate_limit_wait,
        now,
    );
    write_status(request, current, desired, ctx).await?;
    Ok(requeue_at(now, retry))
}

/// The status a mint attempt ends with: `status`, the `RateLimited` condition for how long the
/// attempt waited for the rate limit (as of `at`), and the serving policy.
fn after_attempt(
    served: &Served,
    status: EmbedUrlRequestStatus,
    request: &EmbedUrlRequest,
    current: &EmbedUrlRequestStatus,
    spec: &ValidSpec,
    rate_limit_wait: RateLimitWait,
    at: Timestamp,
) -> EmbedUrlRequestStatus {
    served.stamp(with_rate_limit(
        status,
        current,
        rate_limit_wait,
        spec.refresh_before,
        request.meta().generation,
        at,
    ))
}

/// Why a Secret write was refused, and how long its mint waited for the rate limit.
struct SecretRefusal<'a> {
    error: &'a Error,
    rate_limit_wait: RateLimitWait,
}

/// An object whose spec or status does not even deserialize (written around the schema):
/// report the offending field, call nothing.
async fn reconcile_unreadable(invalid: &InvalidObject, ctx: &Context) -> Result<Next> {
    let namespace = invalid.metadata.namespace.clone().unwrap_or_default();
    let name = invalid.metadata.name.clone().unwrap_or_default();
    let resource = ApiResource::erase::<EmbedUrlRequest>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &namespace, &resource);
    let Some(raw) = api
        .get_opt(&name)
        .await
        .map_err(Error::kube("reading an unreadable request"))?
    else {
        return Ok(Next::await_change());
    };
    let problem = locate_deserialize_error(&raw.data).unwrap_or_else(|| InvalidSpec {
        field: "spec".to_string(),
        message: invalid.error.clone(),
    });
    let mut shell = EmbedUrlRequest::new(&name, EmbedUrlRequestSpec::default());
    shell.metadata = invalid.metadata.clone();
    // A status that parses is kept; one that does not is replaced wholesale.
    let stored_status = raw.data.get("status").filter(|s| !s.is_null());
    let parsed_status = match stored_status {
        None => Some(EmbedUrlRequestStatus::default()),
        Some(status) => serde_json::from_value(status.clone()).ok(),
    };
    let Some(current) = parsed_status else {
        // Server-side apply cannot do that: it leaves the fields other managers wrote (the
        // unreadable ones) in place, so the object stayed unreadable and the request stuck at
        // InvalidSpec for ever, even with a valid spec. If only the status was at fault, it is
        // emptied and the next reconcile (the object now reads) serves the request; otherwise
        // it becomes the InvalidSpec status.
        let replacement = if problem.field == "status" || problem.field.starts_with("status.") {
            EmbedUrlRequestStatus::default()
        } else {
            invalid_spec_status(
                &EmbedUrlRequestStatus::default(),
                invalid.metadata.generation,
                &problem,
                Timestamp::now(),
            )
        };
        publish_schedule(ctx, &shell, &replacement);
        replace_status(ctx, &namespace, &name, stored_status, &replacement).await?;
        publish_transition(ctx, &shell, &EmbedUrlRequestStatus::default(), &replacement).await;
        return Ok(Next::await_change());
    };
    let desired = invalid_spec_status(
        &current,
        invalid.metadata.generation,
        &problem,
        Timestamp::now(),
    );
    publish_schedule(ctx, &shell, &desired);
    if desired != current {
        // The answer is read as metadata only: the object does not deserialize as an
        // EmbedUrlRequest. (Read whole, the write succeeded but the reconcile failed reading
        // the answer: no event was published, and it was retried 5 s later.)
        apply_status_of(ctx, &namespace, &name, &current, &desired).await?;
        publish_transition(ctx, &shell, &current, &desired).await;
    }
    Ok(Next::await_change())
}

/// Names the first field of `object` that does not deserialize, e.g.
/// `spec.quickSight.sessionLifetimeInMinutes: invalid type: string "ten", expected i64`.
fn locate_deserialize_error(object: &serde_json::Value) -> Option<InvalidSpec> {
    for part in ["spec", "status"] {
        let Some(value) = object.get(part) else {
            if part == "spec" {
                return Some(InvalidSpec {
                    field: "spec".to_string(),
                    message: "missing".to_string(),
                });
            }
            continue;
        };
        // A struct also deserializes from a JSON array (its fields by position), so a list
        // where the spec should be was reported at a misleading path such as `spec.[0]: missing
        // field ...`. Name the part itself when it is not an object.
        if !value.is_object() {
            if part == "status" && value.is_null() {
                continue;
            }
            let found = match value {
                serde_json::Value::Null => "null",
                serde_json::Value::Bool(_) => "boolean",
                serde_json::Value::Number(_) => "number",
                serde_json::Value::String(_) => "string",
                serde_json::Value::Array(_) => "sequence",
                serde_json::Value::Object(_) => "map",
            };
            return Some(InvalidSpec {
                field: part.to_string(),
                message: format!("invalid type: {found}, expected an object"),
            });
        }
        let result: Result<(), serde_path_to_error::Error<serde_json::Error>> = match part {
            "spec" => serde_path_to_error::deserialize::<_, EmbedUrlRequestSpec>(value).map(|_| ()),
            _ => serde_path_to_error::deserialize::<_, EmbedUrlRequestStatus>(value).map(|_| ()),
        };
        if let Err(error) = result {
            let path = error.path().to_string();
            let field = if path == "." {
                part.to_string()
            } else {
                format!("{part}.{path}")
            };
            return Some(InvalidSpec {
                field,
                message: error.into_inner().to_string(),
            });
        }
    }
    None
}

/// `planned`, or a prompt second look if the Secret changed under the write.
fn after_write(written: &SecretWritten, now: Timestamp, planned: Timestamp) -> Next {
    if written.changed_meanwhile {
        Next::requeue(Duration::from_millis(100))
    } else {
        requeue_at(now, planned)
    }
}

fn requeue_at(now: Timestamp, at: Timestamp) -> Next {
    Next::requeue(schedule::until(now, at).max(Duration::from_millis(100)))
}

/// How a permitted request is served.
struct Served {
    policy: Option<String>,
    region: String,
    identity: Identity,
    /// Said in the Ready message of a request served in permissive mode without a policy.
    permissive: bool,
}

impl Served {
    /// Records the serving policy in a desired status, and the permissive note in its Ready
    /// message.
    fn stamp(&self, mut status: EmbedUrlRequestStatus) -> EmbedUrlRequestStatus {
        status.policy = self.policy.as_deref().map(CompactString::from);
        if self.permissive
            && let Some(ready) = status
                .conditions
                .iter_mut()
                .find(|c| c.type_ == READY_CONDITION)
            && !ready.message.contains(PERMISSIVE_NOTE)
        {
            ready.message.push_str(PERMISSIVE_NOTE);
        }
        status
    }
}

const PERMISSIVE_NOTE: &str = " (served with the operator's own AWS identity: --policy-mode=permissive and no EmbedUrlPolicy selects this namespace)";

enum Refusal {
    NotPermitted(String),
    Invalid(InvalidSpec),
}

/// The request cache's object under `key` if it is still the one with this uid: `None` once it
/// is deleted or re-created under the same name. A relist that no longer shows a request reports
/// no deletion to the queue, so a reconcile checks this as it ends.
fn still_cached(key: &RequestKey, uid: Option<&str>, ctx: &Context) -> Option<Arc<CachedRequest>> {
    ctx.requests
        .get(&ObjectRef::new(&key.name).within(&key.namespace))
        .filter(|cached| cached.meta().uid.as_deref() == uid)
}

/// Whether the watch still shows `request` (by uid) under its name, not being deleted.
fn still_the_same_request(request: &EmbedUrlRequest, ctx: &Context) -> bool {
    still_cached(&RequestKey::of(request), request.meta().uid.as_deref(), ctx)
        .is_some_and(|cached| cached.meta().deletion_timestamp.is_none())
}

/// A request whose namespace is being deleted: it is about to go too, so it keeps no metric
/// series and waits, without a status that would only alarm, for its own deletion.
fn namespace_going_away(request: &EmbedUrlRequest, ctx: &Context) -> Next {
    let key = RequestKey::of(request);
    ctx.metrics.forget_request(&key.namespace, &key.name);
    Next::await_change()
}

/// Whether the namespace of a request whose Secret is missing is being deleted.
///
/// The namespace watch answers first. When it still shows the namespace live but the Secret a
/// URL was written to (the status has a use-by time) has gone, the API server is asked: the
/// namespace controller deletes a namespace's Secrets right after marking it, and that
/// deletion can reach the operator's Secret watch before the mark reaches its namespace watch
/// (separate watches, each behind by its own amount). Minting then would spend an AWS call and
/// a rate-limit token on a URL the API server refuses to store. A Secret deleted by hand costs
/// this one extra read before it is restored; a failed read is treated as "not terminating",
/// and the refused create that may follow still ends the reconcile quietly.
async fn namespace_terminating(
    request: &EmbedUrlRequest,
    current: &EmbedUrlRequestStatus,
    spec: &ValidSpec,
    ctx: &Context,
) -> bool {
    let namespace = request.namespace().unwrap_or_default();
    let cached = ctx.namespaces.get(&ObjectRef::new(&namespace));
    if cached.is_some_and(|ns| ns.metadata.deletion_timestamp.is_some()) {
        return true;
    }
    let written_before = current.url_expires_at.is_some()
        && current.secret_name.as_deref() == Some(spec.secret_name.as_str());
    if !written_before || spec.suspend {
        // A first mint (or one for a renamed Secret): nothing was deleted. A suspended request
        // mints nothing, so it need not know.
        return false;
    }
    // A list by name needs only the list verb the namespace watch already has (no get).
    let by_name = ListParams::default().fields(&format!("metadata.name={namespace}"));
    match Api::<Namespace>::all(ctx.client.clone())
        .list_metadata(&by_name)
        .await
    {
        // A namespace already gone would mean its requests are gone too, and a stale one
        // meets the create's refusal; only the deletion mark decides.
        Ok(found) => found
            .items
            .first()
            .is_some_and(|ns| ns.metadata.deletion_timestamp.is_some()),
        Err(error) => {
            // Rare (only for a missing Secret), so worth a warning: a missing RBAC rule shows.
            warn!(
                namespace = &*namespace,
                error = %error,
                "could not read the namespace of a request whose Secret is missing; minting anyway"
            );
            false
        }
    }
}

/// Checks the request against the policies and picks the region and AWS identity to use.
fn authorize(
    namespace: &str,
    spec: &ValidSpec,
    ctx: &Context,
) -> std::result::Result<Served, Refusal> {
    let policies = ctx.policies.state();
    let policies: Vec<&EmbedUrlPolicy> = policies.iter().map(Arc::as_ref).collect();
    let known = ctx.namespaces.get(&ObjectRef::new(namespace));
    let labels = known
        .as_ref()
        .and_then(|ns| ns.metadata.labels.clone())
        .unwrap_or_default();
    let ask = Ask {
        namespace,
        namespace_labels: &labels,
        namespace_known: known.is_some(),
        target: &spec.target,
        region: spec.region.as_deref(),
        operator_region: ctx.settings.default_region.as_deref(),
    };
    match policy::decide(&policies, &ask, ctx.settings.policy_mode) {
        Decision::Denied { message } => Err(Refusal::NotPermitted(message)),
        Decision::Allowed {
            policy,
            role,
            default_region,
        } => {
            let region = validation::resolve_region(
                spec,
                default_region.as_deref(),
                ctx.settings.default_region.as_deref(),
            )
            .map_err(Refusal::Invalid)?;
            let identity = match (&role, &policy) {
                (Some(role), Some(policy)) => ctx.aws.assumed(role, &region, namespace, policy),
                _ => ctx.aws.own(),
            };
            Ok(Served {
                permissive: policy.is_none(),
                policy,
                region,
                identity,
            })
        }
    }
}

/// What the status needs while waiting.
enum Waiting {
    /// The cached status describes the Secret's URL (or a failure backoff runs): it is current.
    UpToDate,
    /// The status write after the last mint was lost: this status, rebuilt from the Secret.
    Repair(Box<EmbedUrlRequestStatus>),
    /// The cached request is older than the stored one, which already describes the Secret (the
    /// Secret's watch event came first), or the request is gone: write nothing.
    StaleCache,
}

/// The status while waiting. Normally the stored status already says everything and nothing is
/// written. When the status does not describe the URL the Secret holds (the status write after
/// a mint was lost, or the cache has not caught up with it), the request is read fresh, and the
/// status repaired from the Secret only if it really lags.
async fn waiting_status(
    request: &EmbedUrlRequest,
    current: &EmbedUrlRequestStatus,
    spec: &ValidSpec,
    stored: Option<&StoredUrl>,
    until: Timestamp,
    ctx: &Context,
) -> Result<Waiting> {
    let Some(stored) = stored else {
        // Waiting without a URL only happens during a failure backoff: the status is current.
        return Ok(Waiting::UpToDate);
    };
    let described =
        schedule::parse_time(current.url_expires_at.as_deref()) == Some(stored.expires_at);
    let failing = current.consecutive_failures.unwrap_or(0) > 0;
    if described || failing {
        return Ok(Waiting::UpToDate);
    }
    let api: Api<EmbedUrlRequest> =
        Api::namespaced(ctx.client.clone(), &request.namespace().unwrap_or_default());
    let Some(fresh) = api
        .get_opt(&request.name_any())
        .await
        .map_err(Error::kube("re-reading the request"))?
    else {
        return Ok(Waiting::StaleCache);
    };
    let fresh_status = fresh.status.unwrap_or_default();
    if schedule::parse_time(fresh_status.url_expires_at.as_deref()) == Some(stored.expires_at) {
        return Ok(Waiting::StaleCache);
    }
    let window = ctx.settings.windows.for_service(spec.service());
    let minted_at = schedule::sub(stored.expires_at, window);
    let mut repaired = minted_status(request, current, spec, minted_at, stored.expires_at, until);
    repaired.session_expires_at = stored.session_expires_at.map(|t| secret::rfc3339(t).into());
    repaired.observed_generation = stored.generation.or(repaired.observed_generation);
    Ok(Waiting::Repair(Box::new(repaired)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guard::Guarded;
    use kube::runtime::reflector::{self, store::Writer};
    use kube::runtime::watcher;
    use serde_json::json;

    /// A context whose API server refuses every connection, so that a reconcile fails at its
    /// first read (the Secret's metadata), with its caches listed and permissive policies.
    fn failing_context() -> (Arc<Context>, Writer<CachedRequest>) {
        let config = kube::Config::new("http://127.0.0.1:1".parse().unwrap());
        let client = kube::Client::try_from(config).unwrap();
        let aws = aws_config::SdkConfig::builder()
            .behavior_version(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new("us-east-1"))
            .build();
        let (requests, writer) = reflector::store();
        let context = Context {
            client,
            aws: Arc::new(AwsClients::new(aws)),
            settings: Settings {
                windows: UseByWindows::documented(),
                default_region: Some("us-east-1".into()),
                policy_mode: PolicyMode::Permissive,
            },
            reporter: Reporter {
                controller: "test".into(),
                instance: None,
            },
            secrets: Arc::default(),
            requests,
            policies: reflector::store().0,
            namespaces: reflector::store().0,
            policies_listed: Arc::new(AtomicBool::new(true)),
            namespaces_listed: Arc::new(AtomicBool::new(true)),
            queue: Arc::new(WorkQueue::new(1, Box::new(|_| 0))),
            rate_limits: Arc::new(RateLimits::unlimited()),
            metrics: Arc::new(Metrics::new()),
            failures: Arc::default(),
        };
        (Arc::new(context), writer)
    }

    fn cached(request: &EmbedUrlRequest) -> CachedRequest {
        Guarded(Ok(request.clone()))
    }

    /// Starts `request` through the queue, as the dispatcher does, and runs its reconcile;
    /// `meanwhile` runs once the reconcile holds its slot.
    async fn reconcile_once(
        ctx: &Arc<Context>,
        request: &EmbedUrlRequest,
        meanwhile: impl FnOnce(),
    ) {
        ctx.queue.schedule_now(&RequestKey::of(request));
        let running = ctx.queue.next(|_| {}).await;
        meanwhile();
        reconcile(Arc::new(cached(request)), ctx.clone(), running).await;
    }

    #[tokio::test]
    async fn a_reconcile_of_a_request_deleted_meanwhile_leaves_no_failure_count_behind() {
        let (ctx, mut writer) = failing_context();
        let request: EmbedUrlRequest = serde_json::from_value(json!({
            "apiVersion": "embedurl.io/v1alpha1",
            "kind": "EmbedUrlRequest",
            "metadata": {"name": "sales", "namespace": "analytics", "uid": "uid-1", "generation": 1},
            "spec": {"quickSight": {"awsAccountId": "111122223333", "entryPoint": "/start"}},
        }))
        .unwrap();
        writer.apply_watcher_event(&watcher::Event::Apply(cached(&request)));

        // Still there: the failure is counted, for the retry's backoff.
        reconcile_once(&ctx, &request, || {}).await;
        assert_eq!(ctx.failures.count("analytics", "sales"), Some(1));
        reconcile_once(&ctx, &request, || {}).await;
        assert_eq!(ctx.failures.count("analytics", "sales"), Some(2));

        // Deleted while the reconcile ran, the watch's clean-up coming first: the reconcile's own
        // failure is not left behind (it would set the backoff of a request re-created under
        // the same name).
        ctx.failures.forget("analytics", "sales");
        reconcile_once(&ctx, &request, || {
            ctx.queue.forget(&RequestKey::of(&request))
        })
        .await;
        assert_eq!(ctx.failures.count("analytics", "sales"), None);

        // Gone from the cache without a deletion reaching the queue (a relist no longer shows
        // it): the same.
        reconcile_once(&ctx, &request, || {}).await;
        assert_eq!(ctx.failures.count("analytics", "sales"), Some(1));
        writer.apply_watcher_event(&watcher::Event::Delete(cached(&request)));
        ctx.failures.forget("analytics", "sales");
        reconcile_once(&ctx, &request, || {}).await;
        assert_eq!(ctx.failures.count("analytics", "sales"), None);

        // Re-created under the same name (another uid): the old object's reconcile cleans up.
        let mut successor = request.clone();
        successor.metadata.uid = Some("uid-2".into());
        writer.apply_watcher_event(&watcher::Event::Apply(cached(&successor)));
        reconcile_once(&ctx, &request, || {}).await;
        assert_eq!(ctx.failures.count("analytics", "sales"), None);
        reconcile_once(&ctx, &successor, || {}).await;
        assert_eq!(ctx.failures.count("analytics", "sales"), Some(1));
    }

    #[test]
    fn a_mint_is_as_urgent_as_the_status_says_not_as_the_secret_says() {
        let written: Timestamp = "2026-11-22T10:05:00Z".parse().unwrap();
        let status = EmbedUrlRequestStatus {
            url_expires_at: Some("2026-11-22T10:05:00Z".into()),
            ..Default::default()
        };
        // A Secret whose expiresAt its owner set to 1970 does not put it first in line.
        let edited = StoredUrl {
            expires_at: Timestamp::UNIX_EPOCH,
            session_expires_at: None,
            generation: Some(1),
            metadata_intact: true,
        };
        assert_eq!(mint_urgency(&status, Some(&edited)), written);
        // Nor does a deleted Secret.
        assert_eq!(mint_urgency(&status, None), written);
        // Before the first status write, the Secret's time, but never earlier than now (as
        // urgent as a request never given a URL).
        let empty = EmbedUrlRequestStatus::default();
        let before = Timestamp::now();
        assert!(mint_urgency(&empty, Some(&edited)) >= before);
        let in_an_hour = schedule::add(before, Duration::from_secs(3600));
        let later = StoredUrl {
            expires_at: in_an_hour,
            ..edited
        };
        assert_eq!(mint_urgency(&empty, Some(&later)), in_an_hour);
        assert!(mint_urgency(&empty, None) >= before);
    }

    #[test]
    fn api_errors_back_off_after_three_quick_retries() {
        let delays: Vec<u64> = (1..=9)
            .map(|n| api_retry_delay(true, n).as_secs())
            .collect();
        assert_eq!(delays, vec![5, 5, 5, 10, 20, 40, 60, 60, 60]);
        assert_eq!(api_retry_delay(false, 1), Duration::from_secs(60));
        // Never past half of what the current URL has left, at least a second; with jitter
        // at most 20 % longer otherwise.
        let left = |secs| Some(Duration::from_secs(secs));
        assert_eq!(
            retry_delay_after_api_error(true, 1, left(4), 1.0),
            Duration::from_secs(2)
        );
        assert_eq!(
            retry_delay_after_api_error(true, 1, left(1), 0.0),
            Duration::from_secs(1)
        );
        assert_eq!(
            retry_delay_after_api_error(true, 1, left(300), 1.0),
            Duration::from_secs(6)
        );
        assert_eq!(
            retry_delay_after_api_error(true, 1, None, 0.0),
            Duration::from_secs(5)
        );
        // A refusal waits its minute: retrying soon would only mint and lose another URL.
        assert_eq!(
            retry_delay_after_api_error(false, 1, left(4), 0.0),
            Duration::from_secs(60)
        );
        assert_eq!(api_retry_delay(true, u32::MAX), Duration::from_secs(60));
    }

    #[test]
    fn locates_the_field_that_does_not_deserialize() {
        let object = json!({"spec": {"quickSight": {"awsAccountId": "111122223333", "sessionLifetimeInMinutes": "ten"}}});
        let problem = locate_deserialize_error(&object).unwrap();
        assert_eq!(problem.field, "spec.quickSight.sessionLifetimeInMinutes");
        assert!(
            problem.message.contains("invalid type"),
            "{}",
            problem.message
        );

        let object = json!({"spec": {"flink": {"applicationName": "a", "urlType": "BOGUS"}}});
        assert_eq!(
            locate_deserialize_error(&object).unwrap().field,
            "spec.flink.urlType"
        );

        let object = json!({"spec": {}, "status": {"consecutiveFailures": -1}});
        assert_eq!(
            locate_deserialize_error(&object).unwrap().field,
            "status.consecutiveFailures"
        );
        assert_eq!(locate_deserialize_error(&json!({})).unwrap().field, "spec");

        // Not an object at all: the part itself is named, not a position inside it.
        let object = json!({"spec": [{"quickSight": {"awsAccountId": "111122223333"}}]});
        let problem = locate_deserialize_error(&object).unwrap();
        assert_eq!(
            problem.to_string(),
            "spec: invalid type: sequence, expected an object"
        );
        let object = json!({"spec": {}, "status": "broken"});
        assert_eq!(
            locate_deserialize_error(&object).unwrap().to_string(),
            "status: invalid type: string, expected an object"
        );
    }
}
