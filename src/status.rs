//! What the request's status should say after each outcome of a reconcile.
//!
//! Pure functions: they take the current status and what happened, and return the desired
//! status. The reconciler writes it only if it differs from the current one.

use crate::crd::{
    Condition, EmbedUrlRequest, EmbedUrlRequestStatus, RATE_LIMITED_CONDITION, READY_CONDITION,
    REFRESH_REQUESTED_AT_ANNOTATION,
};
use crate::providers::AwsCallError;
use crate::schedule;
use crate::secret::{self, StoredSecret, StoredUrl};
use crate::validation::{InvalidSpec, ValidSpec};
use compact_str::CompactString;
use jiff::Timestamp;
use kube::{Resource, ResourceExt};

/// Condition reasons (part of the API: users and alerts match on them).
pub mod reasons {
    pub const URL_READY: &str = "UrlReady";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const SECRET_CONFLICT: &str = "SecretConflict";
    pub const SUSPENDED: &str = "Suspended";
    pub const NOT_PERMITTED: &str = "NotPermitted";
    pub const ASSUME_ROLE_FAILED: &str = "AssumeRoleFailed";
    /// The API server refused the Secret write after a URL was minted for it.
    pub const SECRET_WRITE_FAILED: &str = "SecretWriteFailed";
    /// `RateLimited=True`: the operator's AWS rate limit delayed the last refresh.
    pub const DEMAND_EXCEEDS_RATE_LIMIT: &str = "DemandExceedsRateLimit";
    /// `RateLimited=False`: the last refresh went out without a noticeable wait.
    pub const WITHIN_RATE_LIMIT: &str = "WithinRateLimit";

    use crate::providers::AwsErrorKind;

    /// Every reason the `Ready` condition can give.
    pub const READY: [&str; 10] = [
        URL_READY,
        INVALID_SPEC,
        SECRET_CONFLICT,
        SUSPENDED,
        NOT_PERMITTED,
        ASSUME_ROLE_FAILED,
        SECRET_WRITE_FAILED,
        AwsErrorKind::Throttled.reason(),
        AwsErrorKind::Unavailable.reason(),
        AwsErrorKind::Rejected.reason(),
    ];

    /// The `Ready` reasons of requests the operator does not refresh: they make no AWS calls.
    pub const HALTED: [&str; 4] = [SUSPENDED, NOT_PERMITTED, SECRET_CONFLICT, INVALID_SPEC];

    /// A `Ready` reason as one of [`READY`] (or `Other`, for one this version does not give): a
    /// fixed set of metric label values, kept in one byte per request.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct ReadyReason(u8);

    impl ReadyReason {
        pub fn of(reason: &str) -> Self {
            let index = READY.iter().position(|known| *known == reason);
            // READY has ten entries; its length stands for `Other`.
            ReadyReason(index.unwrap_or(READY.len()) as u8)
        }

        pub fn as_str(self) -> &'static str {
            READY.get(usize::from(self.0)).copied().unwrap_or("Other")
        }
    }
}

pub fn refresh_request(request: &EmbedUrlRequest) -> Option<&str> {
    request
        .annotations()
        .get(REFRESH_REQUESTED_AT_ANNOTATION)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

/// The condition reason of a failed mint: STS failures say so, AWS service failures by kind.
pub fn failure_reason(error: &AwsCallError) -> &'static str {
    if error.operation == "AssumeRole" {
        reasons::ASSUME_ROLE_FAILED
    } else {
        error.kind.reason()
    }
}

/// The `Ready` condition, keeping `lastTransitionTime` when the status value does not change.
pub fn ready(
    previous: &EmbedUrlRequestStatus,
    is_ready: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    // Alerts and the metric's label match on the known set: a new reason belongs in it.
    debug_assert!(reasons::READY.contains(&reason), "{reason} not in READY");
    condition(
        READY_CONDITION,
        previous,
        is_ready,
        reason,
        message,
        generation,
        now,
    )
}

/// A condition of type `type_`, keeping `lastTransitionTime` when its status does not change.
fn condition(
    type_: &str,
    previous: &EmbedUrlRequestStatus,
    is_true: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if is_true { "True" } else { "False" };
    let last_transition_time = previous
        .condition(type_)
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| secret::rfc3339(now).into());
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time,
    }
}

pub fn with_ready(status: EmbedUrlRequestStatus, condition: Condition) -> EmbedUrlRequestStatus {
    with_condition(status, condition)
}

fn with_condition(
    mut status: EmbedUrlRequestStatus,
    condition: Condition,
) -> EmbedUrlRequestStatus {
    match status
        .conditions
        .iter_mut()
        .find(|c| c.type_ == condition.type_)
    {
        Some(existing) => *existing = condition,
        None => status.conditions.push(condition),
    }
    status
}

/// How long a mint waited for the operator's AWS rate limit, and the limit it waited for.
#[derive(Clone, Copy, Debug)]
pub struct RateLimitWait {
    /// In the bucket's line, this time.
    pub waited: std::time::Duration,
    /// Whether the mint had to wait in line at all (no token was free for it).
    pub waited_in_line: bool,
    /// How far past its planned time the mint started: turned away by a full line, waiting for
    /// a reconcile slot, then in line.
    pub late_by: std::time::Duration,
    /// Calls per second and burst of the limit (per service, region and identity).
    pub rate: f64,
    pub burst: u32,
}

/// Records in `status` whether the operator's AWS rate limit delayed this attempt (see
/// [`crate::ratelimit::delayed_refresh`]). The condition appears the first time a refresh is
/// delayed, then says `False` once they go out on time again: requests that were never delayed
/// carry no such condition.
pub fn with_rate_limit(
    status: EmbedUrlRequestStatus,
    previous: &EmbedUrlRequestStatus,
    wait: RateLimitWait,
    refresh_before: std::time::Duration,
    generation: Option<i64>,
    now: Timestamp,
) -> EmbedUrlRequestStatus {
    let delayed =
        crate::ratelimit::delayed_refresh(wait.waited_in_line, wait.late_by, refresh_before);
    let new_condition = if delayed {
        condition(
            RATE_LIMITED_CONDITION,
            previous,
            true,
            reasons::DEMAND_EXCEEDS_RATE_LIMIT,
            format!(
                "The last refresh started {:.1}s after its planned time, waiting its turn for \
                 the operator's AWS rate limit ({} calls/s, burst {}, shared by all requests of \
                 one service, region and identity): more URLs fall due than that rate allows, and \
                 if demand stays this high URLs will lapse. Raise --aws-qps (chart value \
                 awsRateLimit.qps) as far as the AWS account's quota allows, or spread requests \
                 over more roles or regions",
                wait.late_by.as_secs_f64(),
                wait.rate,
                wait.burst
            ),
            generation,
            now,
        )
    } else if previous.condition(RATE_LIMITED_CONDITION).is_some() {
        condition(
            RATE_LIMITED_CONDITION,
            previous,
            false,
            reasons::WITHIN_RATE_LIMIT,
            "The last refresh went out without waiting for the operator's AWS rate limit"
                .to_string(),
            generation,
            now,
        )
    } else {
        return status;
    };
    with_condition(status, new_condition)
}

/// Longest field path and explanation an `InvalidSpec` message carries. Validation and
/// deserialization messages quote the offending value, which can be as large as the object
/// itself (a 1 MB string in a spec written around the schema): copied whole into the status it
/// would double the object's size, which a real API server refuses beyond its limit (about
/// 1.5 MB), leaving the request without any condition. The path comes first, so it survives.
const MAX_INVALID_SPEC_MESSAGE: usize = 1024;

/// The API server refuses an Event whose `note` is longer than this, in bytes.
const EVENT_NOTE_LIMIT: usize = 1024;

/// The note of an Event about a condition: its message, cut to what the API server accepts. The
/// limit is in bytes, and AWS error messages quoted in conditions are not always ASCII.
pub fn event_note(message: &str) -> String {
    shorten(message, EVENT_NOTE_LIMIT - '…'.len_utf8())
}

/// `text` cut to at most `max` bytes (on a character boundary), marked with an ellipsis.
fn shorten(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

pub fn invalid_spec_status(
    current: &EmbedUrlRequestStatus,
    generation: Option<i64>,
    invalid: &InvalidSpec,
    now: Timestamp,
) -> EmbedUrlRequestStatus {
    let status = EmbedUrlRequestStatus {
        observed_generation: generation,
        next_refresh_time: None,
        ..current.clone()
    };
    let message = format!(
        "{}. No URL is minted until the spec is fixed.",
        shorten(&invalid.to_string(), MAX_INVALID_SPEC_MESSAGE)
    );
    let condition = ready(
        current,
        false,
        reasons::INVALID_SPEC,
        message,
        generation,
        now,
    );
    with_ready(status, condition)
}

/// The current status, with `Ready=True` restored if the Secret holds a usable URL, nothing is
/// failing, and the condition says otherwise (left from `NotPermitted`, say).
pub fn ready_again(
    request: &EmbedUrlRequest,
    current: &EmbedUrlRequestStatus,
    spec: &ValidSpec,
    usable: Option<&StoredUrl>,
    now: Timestamp,
) -> EmbedUrlRequestStatus {
    let healthy = current.consecutive_failures.unwrap_or(0) == 0;
    let ready_now = current.ready().is_some_and(|c| c.status == "True");
    match usable {
        Some(url) if healthy && !ready_now => {
            let message = format!(
                "Secret {:?} holds a URL usable until {}",
                spec.secret_name,
                secret::rfc3339(url.expires_at)
            );
            let generation = request.meta().generation;
            with_ready(
                current.clone(),
                ready(current, true, reasons::URL_READY, message, generation, now),
            )
        }
        _ => current.clone(),
    }
}

/// A request the operator does not refresh for now: nothing is scheduled, and `Ready` is False
/// with `reason`. The URL already in the Secret, if any, is left to expire.
fn halted(
    current: &EmbedUrlRequestStatus,
    request: &EmbedUrlRequest,
    spec: &ValidSpec,
    reason: &str,
    message: String,
    now: Timestamp,
) -> EmbedUrlRequestStatus {
    let generation = request.meta().generation;
    let status = EmbedUrlRequestStatus {
        service: Some(spec.service().name().into()),
        secret_name: Some(spec.secret_name.as_str().into()),
        observed_generation: generation,
        next_refresh_time: None,
        ..current.clone()
    };
    with_ready(
        status,
        ready(current, false, reason, message, generation, now),
    )
}

pub fn not_permitted_status(
    current: &EmbedUrlRequestStatus,
    request: &EmbedUrlRequest,
    spec: &ValidSpec,
    message: &str,
    now: Timestamp,
) -> EmbedUrlRequestStatus {
    let message = format!(
        "not permitted: {message}. Nothing is minted; the Secret keeps its last URL until it expires"
    );
    EmbedUrlRequestStatus {
        policy: None,
        ..halted(current, request, spec, reasons::NOT_PERMITTED, message, now)
    }
}

pub fn suspended_status(
    current: &EmbedUrlRequestStatus,
    request: &EmbedUrlRequest,
    spec: &ValidSpec,
    stored: &StoredSecret,
    now: Timestamp,
) -> EmbedUrlRequestStatus {
    let message = match stored {
        StoredSecret::Owned { url: Some(url) } => format!(
            "spec.suspend is true: refreshing stopped; the URL in the Secret stops working at {}",
            secret::rfc3339(url.expires_at)
        ),
        _ => "spec.suspend is true: refreshing stopped".to_string(),
    };
    halted(current, request, spec, reasons::SUSPENDED, message, now)
}

pub fn conflict_status(
    current: &EmbedUrlRequestStatus,
    request: &EmbedUrlRequest,
    spec: &ValidSpec,
    controller: Option<&str>,
    now: Timestamp,
) -> EmbedUrlRequestStatus {
    let owner = controller.map_or_else(
        || "it is not managed by this request".to_string(),
        |c| format!("it is controlled by {c}"),
    );
    let message = format!(
        "Secret {:?} already exists and {owner}; it is left untouched. Delete it, or set spec.secretName to another name",
        spec.secret_name
    );
    halted(
        current,
        request,
        spec,
        reasons::SECRET_CONFLICT,
        message,
        now,
    )
}

pub fn minted_status(
    request: &EmbedUrlRequest,
    current: &EmbedUrlRequestStatus,
    spec: &ValidSpec,
    minted_at: Timestamp,
    expires_at: Timestamp,
    next: Timestamp,
) -> EmbedUrlRequestStatus {
    let generation = request.meta().generation;
    let status = EmbedUrlRequestStatus {
        service: Some(spec.service().name().into()),
        secret_name: Some(spec.secret_name.as_str().into()),
        url_expires_at: Some(secret::rfc3339(expires_at).into()),
        session_expires_at: Some(
            secret::rfc3339(schedule::add(minted_at, spec.target.session_length())).into(),
        ),
        last_refresh_time: Some(secret::rfc3339(minted_at).into()),
        next_refresh_time: Some(secret::rfc3339(next).into()),
        observed_generation: generation,
        consecutive_failures: Some(0),
        last_handled_refresh_request: refresh_request(request)
            .map(CompactString::from)
            .or_else(|| current.last_handled_refresh_request.clone()),
        policy: current.policy.clone(),
        conditions: current.conditions.clone(),
    };
    let message = format!(
        "Secret {:?} holds a URL usable until {}",
        spec.secret_name,
        secret::rfc3339(expires_at)
    );
    with_ready(
        status,
        ready(
            current,
            true,
            reasons::URL_READY,
            message,
            generation,
            minted_at,
        ),
    )
}

/// The status after the `failures`-th failed attempt in a row, the next one at `retry`; the
/// rest (the URL's times, the conditions) as in `current`.
fn failing(
    request: &EmbedUrlRequest,
    current: &EmbedUrlRequestStatus,
    spec: &ValidSpec,
    failures: u32,
    retry: Timestamp,
) -> EmbedUrlRequestStatus {
    EmbedUrlRequestStatus {
        service: Some(spec.service().name().into()),
        secret_name: Some(spec.secret_name.as_str().into()),
        next_refresh_time: Some(secret::rfc3339(retry).into()),
        observed_generation: request.meta().generation,
        consecutive_failures: Some(failures),
        // The refresh request is consumed even when the attempt fails; the retry follows the
        // backoff.
        last_handled_refresh_request: refresh_request(request)
            .map(CompactString::from)
            .or_else(|| current.last_handled_refresh_request.clone()),
        ..current.clone()
    }
}

/// The API server refused to write the Secret (RBAC, an admission policy): the URL minted for it
/// is lost, and minting again soon would only lose the next one. Retried like a request AWS
/// rejected, or at once when the spec changes.
#[allow(clippy::too_many_arguments)]
pub fn secret_refused_status(
    request: &EmbedUrlRequest,
    current: &EmbedUrlRequestStatus,
    spec: &ValidSpec,
    refusal: &str,
    failures: u32,
    retry: Timestamp,
    now: Timestamp,
) -> EmbedUrlRequestStatus {
    let generation = request.meta().generation;
    let status = failing(request, current, spec, failures, retry);
    let message = format!(
        "the Kubernetes API server refused to write Secret {:?} ({}), so the URL minted for it was discarded. Check the operator's RBAC and admission policies for Secrets in this namespace, or the secretTemplate; next attempt at {} (failure {failures}), or at once when the spec changes",
        spec.secret_name,
        shorten(refusal, MAX_INVALID_SPEC_MESSAGE),
        secret::rfc3339(retry)
    );
    with_ready(
        status,
        ready(
            current,
            false,
            reasons::SECRET_WRITE_FAILED,
            message,
            generation,
            now,
        ),
    )
}

#[allow(clippy::too_many_arguments)]
pub fn failed_status(
    request: &EmbedUrlRequest,
    current: &EmbedUrlRequestStatus,
    spec: &ValidSpec,
    error: &AwsCallError,
    failures: u32,
    still_usable_until: Option<Timestamp>,
    retry: Timestamp,
    now: Timestamp,
) -> EmbedUrlRequestStatus {
    let generation = request.meta().generation;
    let status = failing(request, current, spec, failures, retry);
    let kept = match still_usable_until {
        Some(until) => format!(
            "the current URL stays in the Secret, usable until {}",
            secret::rfc3339(until)
        ),
        None => "the Secret holds no usable URL".to_string(),
    };
    let message = format!(
        "{} failed with {}: {}; {kept}; next attempt at {} (failure {failures})",
        error.operation,
        error.code,
        error.message,
        secret::rfc3339(retry)
    );
    let is_ready = still_usable_until.is_some() && error.kind.is_retryable();
    with_ready(
        status,
        ready(
            current,
            is_ready,
            failure_reason(error),
            message,
            generation,
            now,
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_reasons_become_a_fixed_set_of_metric_labels() {
        use reasons::ReadyReason;
        for reason in reasons::READY {
            assert_eq!(ReadyReason::of(reason).as_str(), reason);
        }
        assert_eq!(ReadyReason::of("Suspended").as_str(), reasons::SUSPENDED);
        assert_eq!(ReadyReason::of("SomethingNew").as_str(), "Other");
        assert_eq!(ReadyReason::of("").as_str(), "Other");
        assert!(reasons::HALTED.iter().all(|r| reasons::READY.contains(r)));
    }

    #[test]
    fn an_event_note_fits_the_api_servers_limit_in_bytes() {
        assert_eq!(event_note("Throttled by AWS"), "Throttled by AWS");
        // 1,000 characters of two bytes each: 2,000 bytes, cut below 1,024 on a boundary.
        let note = event_note(&"é".repeat(1_000));
        assert!(note.len() <= 1024, "{} bytes", note.len());
        assert!(note.ends_with('…'));
        assert!(note.trim_end_matches('…').chars().all(|c| c == 'é'));
        assert!(event_note(&"a".repeat(5_000)).len() <= 1024);
    }

    #[test]
    fn invalid_spec_messages_do_not_copy_huge_values() {
        let invalid = InvalidSpec {
            field: "spec.quickSight.entryPoint".to_string(),
            message: format!("{:?} is not one of /start, ...", "é".repeat(1 << 20)),
        };
        let t0: Timestamp = "2026-11-22T10:00:00Z".parse().unwrap();
        let status = invalid_spec_status(&EmbedUrlRequestStatus::default(), Some(1), &invalid, t0);
        let message = &status.ready().unwrap().message;
        assert!(message.len() < 1100, "{} bytes", message.len());
        assert!(message.starts_with("spec.quickSight.entryPoint: \"éé"));
        assert!(message.ends_with("…. No URL is minted until the spec is fixed."));
        assert_eq!(shorten("short", 10), "short");
    }

    #[test]
    fn rate_limited_appears_when_a_refresh_is_delayed_and_clears_after() {
        let t0: Timestamp = "2026-11-22T10:00:00Z".parse().unwrap();
        let t1: Timestamp = "2026-11-22T10:05:00Z".parse().unwrap();
        let refresh_before = std::time::Duration::from_secs(150);
        // Late by `secs`, having waited in line for a token (at most a second of it).
        let wait = |secs: u64| RateLimitWait {
            waited: std::time::Duration::from_secs(secs.min(1)),
            waited_in_line: secs > 0,
            late_by: std::time::Duration::from_secs(secs),
            rate: 10.0,
            burst: 20,
        };
        let never = EmbedUrlRequestStatus::default();
        let on_time = with_rate_limit(never.clone(), &never, wait(2), refresh_before, Some(1), t0);
        assert!(
            on_time.conditions.is_empty(),
            "no condition until it applies"
        );

        let delayed = with_rate_limit(never.clone(), &never, wait(40), refresh_before, Some(1), t0);
        let c = delayed.condition(RATE_LIMITED_CONDITION).unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "DemandExceedsRateLimit")
        );
        assert!(
            c.message.contains("40.0s") && c.message.contains("10 calls/s"),
            "{}",
            c.message
        );
        assert!(c.message.contains("--aws-qps"), "{}", c.message);

        let still = with_rate_limit(
            delayed.clone(),
            &delayed,
            wait(30),
            refresh_before,
            Some(1),
            t1,
        );
        let c = still.condition(RATE_LIMITED_CONDITION).unwrap();
        assert_eq!(c.last_transition_time, "2026-11-22T10:00:00Z");
        assert_eq!(still.conditions.len(), 1, "replaced, not added");

        let cleared = with_rate_limit(still.clone(), &still, wait(0), refresh_before, Some(1), t1);
        let c = cleared.condition(RATE_LIMITED_CONDITION).unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "WithinRateLimit")
        );
        assert_eq!(c.last_transition_time, "2026-11-22T10:05:00Z");
    }

    #[test]
    fn ready_keeps_transition_time_while_status_is_unchanged() {
        let t0: Timestamp = "2026-11-22T10:00:00Z".parse().unwrap();
        let t1: Timestamp = "2026-11-22T10:05:00Z".parse().unwrap();
        let first = with_ready(
            EmbedUrlRequestStatus::default(),
            ready(
                &EmbedUrlRequestStatus::default(),
                true,
                reasons::URL_READY,
                "a".into(),
                Some(1),
                t0,
            ),
        );
        let throttled = ready(&first, true, "AwsThrottled", "b".into(), Some(1), t1);
        assert_eq!(throttled.last_transition_time, "2026-11-22T10:00:00Z");
        let failed = ready(&first, false, "AwsRejected", "c".into(), Some(1), t1);
        assert_eq!(failed.last_transition_time, "2026-11-22T10:05:00Z");
    }
}
