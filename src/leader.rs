//! Leader election with a `coordination.k8s.io/v1` Lease, as client-go does it.
//!
//! One replica holds the Lease and runs the controllers; the others stand by and never mint. The
//! refresh schedule lives in the cluster, so a new leader picks up exactly where the old one
//! stopped. A leader that cannot renew within the renewal deadline (each call to the API server
//! bounded by what is left of it) drops its in-flight reconciles and exits, before any standby
//! may consider the Lease expired.

use crate::controller::Readiness;
use crate::http::ReadyFlag;
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a Lease stays valid without renewal.
    pub duration: Duration,
}

impl LeaseConfig {
    /// How often the holder renews, and a candidate retries: a third of the duration.
    fn retry_period(&self) -> Duration {
        (self.duration / 3).max(Duration::from_millis(200))
    }

    /// A leader that has not renewed for this long gives up (two thirds of the duration), so it
    /// stops before any other replica may consider the Lease expired.
    fn renew_deadline(&self) -> Duration {
        self.duration.mul_f64(2.0 / 3.0)
    }

    /// The longest one round on the Lease may take (a quarter of the renewal deadline), so that
    /// a leader whose call got no answer still has time to try again, on another connection.
    fn attempt_limit(&self) -> Duration {
        self.renew_deadline() / 4
    }

    /// How soon a leader tries again after a failed round (a fifteenth of the duration, 1 s for
    /// 15 s): several tries fit in the renewal deadline, so one API server hiccup does not cost
    /// the Lease.
    fn retry_after_failure(&self) -> Duration {
        (self.duration / 15).max(Duration::from_millis(100))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("lost the leader lease {0}: stopped the controllers; restarting is the safe way back")]
    LostLease(String),
    #[error("the controllers stopped on their own; gave the leader lease {0} up")]
    ControllersStopped(String),
}

/// Stands by until this replica holds the Lease, then runs the controllers built by `start`
/// until `stop` turns true (then lets in-flight reconciles finish for up to `drain_limit`, still
/// renewing, and releases the Lease), the Lease is lost (then drops them at once and returns
/// `LostLease`), or the controllers end on their own (then releases the Lease and re-raises
/// their panic, or returns `ControllersStopped`).
pub async fn run_while_leading<F, Fut>(
    client: Client,
    lease: LeaseConfig,
    ready: ReadyFlag,
    mut stop: watch::Receiver<bool>,
    drain_limit: Duration,
    start: F,
) -> Result<(), LeaderError>
where
    F: Fn(Client, watch::Receiver<bool>) -> (Readiness, Fut),
    Fut: Future<Output = ()> + Send + 'static,
{
    let api: Api<Lease> = Api::namespaced(client.clone(), &lease.namespace);
    let mut observed = Observed::default();
    info!(lease = %lease.name, identity = %lease.identity, "standing by for the leader lease");
    let acquired_at = loop {
        if stop_requested(&stop) {
            return Ok(());
        }
        let began = Instant::now();
        match lease_round(&api, &lease, &mut observed, lease.attempt_limit()).await {
            Ok(true) => break began,
            // Standing by is a healthy state once the Lease can be read: the replica is ready to
            // take over. Not before: a replica that cannot reach its Lease (RBAC, a wrong name)
            // could never lead, and a rollout of such replicas must not look successful.
            Ok(false) => ready.set(true),
            Err(error) => {
                ready.set(false);
                warn!(error = %error, "could not read or take the leader lease");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(lease.retry_period()) => {},
            _ = stop.changed() => {},
        }
    };
    if stop_requested(&stop) {
        // Asked to stop while the winning round was in flight: hand the Lease straight back.
        release(&api, &lease).await;
        return Ok(());
    }

    info!(lease = %lease.name, identity = %lease.identity, "became leader, starting controllers");
    ready.set(false);
    let (controllers_stop_tx, controllers_stop_rx) = watch::channel(false);
    let (readiness, controllers) = start(client.clone(), controllers_stop_rx);
    let mut controllers = tokio::spawn(controllers);
    let ready_flag = ready.clone();
    // Ends with this function, however it ends.
    let _marks_ready = crate::controller::AbortOnDrop(tokio::spawn(async move {
        readiness.wait_synced().await;
        ready_flag.set(true);
    }));

    // The deadline counts from when the winning round began, like every later one.
    let mut last_renewal = acquired_at;
    let mut next_round = last_renewal + lease.retry_period();
    // Set once asked to stop: in-flight reconciles may finish until then, and the Lease is still
    // renewed meanwhile, so that no standby takes over while one of them may still write.
    let mut drain_until: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next_round) => {},
            _ = stop.changed(), if drain_until.is_none() => {},
            _ = tokio::time::sleep_until(drain_until.unwrap_or(next_round)), if drain_until.is_some() => {
                warn!(
                    limit_secs = drain_limit.as_secs_f64(),
                    "in-flight reconciles did not finish in time; dropped them"
                );
                controllers.abort();
                let ended = controllers.await;
                release(&api, &lease).await;
                crate::controller::reraise_panic(ended);
                return Ok(());
            }
            ended = &mut controllers => {
                // Drained, or (not asked to stop) ended by a panic (see controller::run):
                // renewing on would keep a replica that reconciles nothing in charge. Either
                // way the Lease is given up so that a standby takes over at once.
                release(&api, &lease).await;
                crate::controller::reraise_panic(ended);
                return if drain_until.is_some() {
                    Ok(())
                } else {
                    Err(LeaderError::ControllersStopped(lease.name.clone()))
                };
            }
        }
        if drain_until.is_none() && stop_requested(&stop) {
            let _ = controllers_stop_tx.send(true);
            drain_until = Some(Instant::now() + drain_limit);
        }
        if Instant::now() < next_round {
            continue;
        }
        // A round may take only what is left of the deadline: a call that never gets an answer
        // must not keep this replica leading past it. The deadline counts from when the last
        // successful round began, as a standby counts from when it saw that round's write.
        let began = Instant::now();
        let left = lease.renew_deadline().saturating_sub(began - last_renewal);
        if left.is_zero() {
            break;
        }
        match lease_round(&api, &lease, &mut observed, left.min(lease.attempt_limit())).await {
            Ok(true) => {
                last_renewal = began;
                next_round = began + lease.retry_period();
            }
            Ok(false) => break,
            Err(error) => {
                warn!(error = %error, "could not renew the leader lease");
                // Retried soon, but never later than the deadline: the next pass stops there.
                next_round = (Instant::now() + lease.retry_after_failure())
                    .min(last_renewal + lease.renew_deadline());
            }
        }
    }

    // Lost: another replica holds the Lease, or may take it once its duration has passed since
    // the last renewal, a third of it from the deadline. In-flight reconciles (an AWS call may
    // take 30 s) are dropped rather than finished, so this one acts no more by then (with more
    // than one worker thread, a reconcile being polled on another one finishes that poll first).
    // What they minted and did not write is only a wasted URL; the Secrets still hold the
    // previous ones.
    let _ = controllers_stop_tx.send(true);
    controllers.abort();
    let _ = controllers.await;
    if drain_until.is_some() {
        // Lost while shutting down anyway: a clean stop, with nothing left to release.
        warn!(lease = %lease.name, "lost the leader lease while draining; dropped the reconciles left");
        return Ok(());
    }
    Err(LeaderError::LostLease(lease.name.clone()))
}

/// Whether this replica was asked to stop. A stop sender that is gone can no longer ask, and
/// waiting on it would return at once, every time: that counts as asked.
fn stop_requested(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow() || stop.has_changed().is_err()
}

/// One read-and-write round on the Lease that gives up after `limit`, so that a call left
/// without an answer (a connection to an API server that went away without closing it) counts
/// as a failed round.
async fn lease_round(
    api: &Api<Lease>,
    config: &LeaseConfig,
    observed: &mut Observed,
    limit: Duration,
) -> Result<bool, String> {
    match tokio::time::timeout(limit, try_acquire_or_renew(api, config, observed)).await {
        Ok(outcome) => outcome.map_err(|error| error.to_string()),
        Err(_) => Err(format!("no answer from the API server within {limit:?}")),
    }
}

/// Takes the Lease if it is free, expired or already ours; renews it if ours. Returns whether
/// this replica holds it afterwards. Every write carries the resourceVersion it was based on, so
/// two candidates racing for an expired Lease cannot both win.
async fn try_acquire_or_renew(
    api: &Api<Lease>,
    config: &LeaseConfig,
    observed: &mut Observed,
) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    // Rounded up: the Lease must not promise standbys less time than this leader may act for.
    let duration_secs =
        i32::try_from(config.duration.as_secs_f64().ceil().max(1.0) as u64).unwrap_or(i32::MAX);
    let Some(mut existing) = api.get_opt(&config.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(config.name.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(config.identity.clone()),
                lease_duration_seconds: Some(duration_secs),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(error) => Err(error),
        };
    };

    let spec = existing.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    let ours = holder.as_deref() == Some(config.identity.as_str());
    if !ours && holder.is_some() && !observed.expired(&existing, Instant::now()) {
        return Ok(false);
    }
    let transitions = spec.lease_transitions.unwrap_or(0);
    existing.spec = Some(LeaseSpec {
        holder_identity: Some(config.identity.clone()),
        lease_duration_seconds: Some(duration_secs),
        acquire_time: if ours {
            spec.acquire_time
        } else {
            Some(MicroTime(now))
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if ours { transitions } else { transitions + 1 }),
        ..spec
    });
    match api
        .replace(&existing.name_any(), &PostParams::default(), &existing)
        .await
    {
        Ok(_) => Ok(true),
        // Someone wrote the Lease between the read and this write. A candidate has lost the
        // race. The holder has not necessarily lost anything (a label added with kubectl also
        // conflicts): a failed round, retried; a real takeover shows on the next read.
        Err(kube::Error::Api(status)) if status.code == 409 && !ours => Ok(false),
        Err(error) => Err(error),
    }
}

/// The Lease as this replica last saw it change, and when, on this replica's own clock. As in
/// client-go, a Lease held by another replica counts as expired once it has not changed for its
/// duration since this replica saw it change: `renewTime` is written by the holder's clock, and
/// comparing it with this one's would move a takeover by however far the two disagree.
#[derive(Debug, Default)]
struct Observed {
    /// The Lease's resourceVersion: every renewal changes it.
    version: Option<String>,
    since: Option<Instant>,
}

impl Observed {
    /// Records `lease` as read at `now`; returns whether it is unchanged for its duration.
    fn expired(&mut self, lease: &Lease, now: Instant) -> bool {
        let version = lease.metadata.resource_version.as_deref();
        let since = match self.since {
            // Without a resourceVersion (no API server omits it) every read counts as a change.
            Some(since) if version.is_some() && self.version.as_deref() == version => since,
            _ => {
                self.version = version.map(str::to_owned);
                self.since = Some(now);
                now
            }
        };
        let seconds = lease
            .spec
            .as_ref()
            .and_then(|spec| spec.lease_duration_seconds)
            .unwrap_or(0);
        let duration = Duration::from_secs(u64::try_from(seconds).unwrap_or(0));
        now.saturating_duration_since(since) >= duration
    }
}

/// Gives the Lease up on a clean shutdown so a standby takes over at once instead of waiting
/// for it to expire.
async fn release(api: &Api<Lease>, config: &LeaseConfig) {
    // Bounded like a renewal: a shutdown must not hang on it; unreleased, the Lease expires.
    let read = tokio::time::timeout(config.retry_period(), api.get_opt(&config.name));
    let Ok(Ok(Some(mut lease))) = read.await else {
        return;
    };
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    if spec.holder_identity.as_deref() != Some(config.identity.as_str()) {
        return;
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    let params = PostParams::default();
    let write = api.replace(&config.name, &params, &lease);
    match tokio::time::timeout(config.retry_period(), write).await {
        Ok(Ok(_)) => info!(lease = %config.name, "released the leader lease"),
        Ok(Err(error)) => {
            warn!(error = %error, "could not release the leader lease; it will expire")
        }
        Err(_) => warn!("no answer releasing the leader lease; it will expire"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_expires_when_unchanged_for_its_duration_as_seen_here() {
        let lease = |version: &str, seconds| Lease {
            metadata: ObjectMeta {
                resource_version: Some(version.into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                // Whatever the holder's clock wrote: not used.
                renew_time: Some(MicroTime("2001-01-01T00:00:00Z".parse().unwrap())),
                lease_duration_seconds: Some(seconds),
                ..Default::default()
            }),
        };
        let start = Instant::now();
        let at = |secs| start + Duration::from_secs(secs);
        let mut observed = Observed::default();
        // First seen now: not expired, however old its renewTime.
        assert!(!observed.expired(&lease("1", 15), at(0)));
        assert!(!observed.expired(&lease("1", 15), at(14)));
        // Renewed (a new version) at 14 s: the 15 s count again from there.
        assert!(!observed.expired(&lease("2", 15), at(14)));
        assert!(!observed.expired(&lease("2", 15), at(28)));
        assert!(observed.expired(&lease("2", 15), at(29)));
        // A Lease without a duration is expired as soon as it is seen.
        assert!(Observed::default().expired(&lease("3", 0), at(0)));
        // Without a resourceVersion, every read counts as a change: never expired by time.
        let mut unversioned = lease("4", 15);
        unversioned.metadata.resource_version = None;
        let mut observed = Observed::default();
        assert!(!observed.expired(&unversioned, at(0)));
        assert!(!observed.expired(&unversioned, at(20)));
    }

    #[test]
    fn renewal_deadline_is_inside_the_lease() {
        let config = LeaseConfig {
            namespace: "ns".into(),
            name: "l".into(),
            identity: "me".into(),
            duration: Duration::from_secs(15),
        };
        assert_eq!(config.retry_period(), Duration::from_secs(5));
        assert_eq!(config.renew_deadline(), Duration::from_secs(10));
        assert_eq!(config.attempt_limit(), Duration::from_millis(2_500));
        assert_eq!(config.retry_after_failure(), Duration::from_secs(1));
    }
}
