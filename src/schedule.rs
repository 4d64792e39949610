//! The refresh schedule: when to mint, and when to look again.
//!
//! Everything here is a pure function of what is stored in the cluster (the request's status and
//! its Secret) and the current time, so a restarted or newly elected operator reaches the same
//! decision as the one before it: it neither mints again for a URL that is still fresh nor lets
//! one lapse.

use crate::crd::EmbedUrlRequestStatus;
use crate::providers::AwsErrorKind;
use crate::secret::StoredUrl;
use jiff::{SignedDuration, Timestamp};
use std::time::Duration;

/// The largest share of `refreshBefore` by which a refresh is brought forward at random, so that
/// many requests created together do not refresh in lockstep. Jitter only ever makes a refresh
/// earlier, never later; and never by more than this share of the time between two refreshes,
/// or a `refreshBefore` close to the window would plan the next refresh before the mint itself.
pub const MAX_JITTER_SHARE: f64 = 0.1;

/// The shortest time between two planned refreshes, as a share of the use-by window: a
/// `refreshBefore` above 90 % of the window counts as 90 % (27 s between QuickSight or Q Business
/// refreshes, 18 s for Flink). Without it `refreshBefore: 299s` would mint every second.
pub const MIN_INTERVAL_SHARE: f64 = 0.1;

/// First retry delay after a retryable AWS error; doubled on every further failure.
pub const RETRY_BASE: Duration = Duration::from_secs(1);
/// Longest retry delay after retryable errors (and at most half the use-by window).
pub const RETRY_CAP: Duration = Duration::from_secs(5 * 60);
/// First retry delay after AWS rejected a request; doubled on every further failure.
pub const REJECTED_BASE: Duration = Duration::from_secs(5 * 60);
/// Longest retry delay after AWS rejected a request.
pub const REJECTED_CAP: Duration = Duration::from_secs(60 * 60);
/// Earliest a retry may come, so that even a URL about to lapse never causes a hot loop.
pub const MIN_RETRY: Duration = Duration::from_millis(500);

/// Why a URL is minted now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MintReason {
    /// The Secret holds no usable URL (new request, Secret deleted or edited by hand).
    NoUrl,
    /// The URL was minted for an older spec.
    SpecChanged,
    /// The user set a new `embedurl.io/refresh-requested-at` value.
    RefreshRequested,
    /// The URL is within `refreshBefore` of its use-by time, or a retry is due.
    Due,
}

impl MintReason {
    pub fn as_str(self) -> &'static str {
        match self {
            MintReason::NoUrl => "no-url",
            MintReason::SpecChanged => "spec-changed",
            MintReason::RefreshRequested => "refresh-requested",
            MintReason::Due => "due",
        }
    }

    /// A planned refresh of a healthy request: what happens every few minutes for every request,
    /// so it is logged at debug, not info. A retry after failures is a recovery, not routine.
    pub fn is_routine(self, consecutive_failures: u32) -> bool {
        self == MintReason::Due && consecutive_failures == 0
    }
}

/// What the reconciler should do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    Mint(MintReason),
    /// Nothing to do until `until` (the planned refresh, or the end of a backoff).
    Wait {
        until: Timestamp,
    },
}

/// The facts a plan is made from.
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    pub now: Timestamp,
    /// `metadata.generation` of the request.
    pub generation: Option<i64>,
    /// Value of the `embedurl.io/refresh-requested-at` annotation.
    pub refresh_request: Option<&'a str>,
    pub status: &'a EmbedUrlRequestStatus,
    /// The usable URL record in the request's own Secret, if there is one.
    pub stored: Option<&'a StoredUrl>,
    pub refresh_before: Duration,
    /// The service's use-by window.
    pub window: Duration,
}

/// Decides whether to mint now or when to look again.
pub fn plan(facts: &Facts<'_>) -> Plan {
    let status = facts.status;
    let next_refresh = parse_time(status.next_refresh_time.as_deref());
    let failing = status.consecutive_failures.unwrap_or(0) > 0;
    let spec_changed_since_last_attempt = status.observed_generation != facts.generation;
    let refresh_requested = facts.refresh_request.is_some()
        && facts.refresh_request != status.last_handled_refresh_request.as_deref();

    // After a failure, honour the backoff the failed attempt wrote, unless the user has changed
    // something since: that is what keeps a rejected request from hammering AWS.
    if failing
        && let Some(retry) = next_refresh
        && facts.now < retry
        && !spec_changed_since_last_attempt
        && !refresh_requested
    {
        return Plan::Wait { until: retry };
    }

    let Some(stored) = facts.stored else {
        return Plan::Mint(MintReason::NoUrl);
    };
    if stored.generation != facts.generation {
        return Plan::Mint(MintReason::SpecChanged);
    }
    if refresh_requested {
        return Plan::Mint(MintReason::RefreshRequested);
    }

    let latest = planned_refresh(stored.expires_at, facts.refresh_before, facts.window, 0.0);
    // The status's nextRefreshTime carries the jitter chosen at mint time. It describes this URL
    // only if the status and the Secret agree on its use-by time; otherwise the status write after
    // the last mint was lost, and the plan falls back to the latest safe time.
    let status_describes_stored =
        parse_time(status.url_expires_at.as_deref()) == Some(stored.expires_at);
    let due = match next_refresh {
        Some(next) if status_describes_stored || failing => next.min(latest),
        _ => latest,
    };
    if facts.now >= due {
        Plan::Mint(MintReason::Due)
    } else {
        Plan::Wait { until: due }
    }
}

// Every time the schedule produces is a whole second, because the cluster stores whole seconds
// (RFC 3339, second precision). Working in the stored precision means the live operator acts on
// exactly the times a restarted one will read back: a use-by time or planned refresh rounded down
// (never claiming time the URL does not have), a retry rounded up (never shortening a backoff, so a
// status write's own echo can never find its retry already due and start a hot loop).

/// The use-by time of a URL minted at `minted_at` with a use-by window of `window`.
pub fn url_expires_at(minted_at: Timestamp, window: Duration) -> Timestamp {
    floor_second(add(minted_at, window))
}

/// When to replace a URL that is usable until `expires_at` (minted a `window` before it):
/// `refresh_before` ahead of it, at most 90 % of the window ([`MIN_INTERVAL_SHARE`]), brought
/// forward by `jitter` (0.0 to 1.0) times [`MAX_JITTER_SHARE`] of `refresh_before` or of the time
/// between refreshes, whichever is shorter.
pub fn planned_refresh(
    expires_at: Timestamp,
    refresh_before: Duration,
    window: Duration,
    jitter: f64,
) -> Timestamp {
    let refresh_before = refresh_before.min(window.mul_f64(1.0 - MIN_INTERVAL_SHARE));
    let interval = window.saturating_sub(refresh_before);
    let jitter = refresh_before
        .min(interval)
        .mul_f64(jitter.clamp(0.0, 1.0) * MAX_JITTER_SHARE);
    floor_second(sub(expires_at, refresh_before + jitter))
}

/// When to try again after the `failures`-th consecutive failure of kind `kind`.
///
/// Retryable errors back off exponentially from [`RETRY_BASE`], with up to 20% of jitter taken
/// off, and never past the current URL's last chance: the moment it stops being usable minus a
/// margin of a tenth of the window (up to a fifth with jitter, so requests minted together do not
/// retry together), so a transient AWS hiccup does not let a Secret lapse. Once the last chance
/// has been tried, the backoff goes on as usual: pulling every retry to "now" from then on would
/// call AWS every second until the URL lapses, in the middle of a throttling storm. Rejected
/// requests back off from [`REJECTED_BASE`] up to [`REJECTED_CAP`]: retrying soon will not help
/// them.
pub fn retry_at(
    now: Timestamp,
    kind: AwsErrorKind,
    failures: u32,
    url_expires_at: Option<Timestamp>,
    window: Duration,
    jitter: f64,
) -> Timestamp {
    let exponent = failures.saturating_sub(1).min(16);
    let (base, cap) = if kind.is_retryable() {
        // A URL that lapsed during an outage is retried at least every half window, so it
        // comes back about as soon as a refresh would have.
        (RETRY_BASE, RETRY_CAP.min(window / 2).max(RETRY_BASE))
    } else {
        (REJECTED_BASE, REJECTED_CAP)
    };
    let delay = base.saturating_mul(1 << exponent).min(cap);
    let delay = delay
        .mul_f64(1.0 - 0.2 * jitter.clamp(0.0, 1.0))
        .max(MIN_RETRY);
    let earliest = ceil_second(add(now, MIN_RETRY));
    let mut retry = ceil_second(add(now, delay));
    if kind.is_retryable()
        && let Some(expires) = url_expires_at
    {
        let margin = (window / 10).mul_f64(1.0 + jitter.clamp(0.0, 1.0));
        let last_chance = floor_second(sub(expires, margin));
        if last_chance >= earliest {
            retry = retry.min(last_chance);
        }
    }
    retry
}

/// `t` with its fraction of a second dropped.
pub fn floor_second(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).unwrap_or(t)
}

/// `t` rounded up to the next whole second (unchanged if it is one).
pub fn ceil_second(t: Timestamp) -> Timestamp {
    let floor = floor_second(t);
    if floor == t {
        t
    } else {
        add(floor, Duration::from_secs(1))
    }
}

/// Parses an RFC 3339 time written by the operator; anything unreadable counts as absent.
pub fn parse_time(text: Option<&str>) -> Option<Timestamp> {
    text.and_then(|t| t.parse().ok())
}

pub fn add(t: Timestamp, d: Duration) -> Timestamp {
    SignedDuration::try_from(d)
        .ok()
        .and_then(|d| t.checked_add(d).ok())
        .unwrap_or(Timestamp::MAX)
}

pub fn sub(t: Timestamp, d: Duration) -> Timestamp {
    SignedDuration::try_from(d)
        .ok()
        .and_then(|d| t.checked_sub(d).ok())
        .unwrap_or(Timestamp::MIN)
}

/// How long from `now` until `t` (zero if `t` has passed).
pub fn until(now: Timestamp, t: Timestamp) -> Duration {
    Duration::try_from(t.duration_since(now)).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::rfc3339;

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    const RB: Duration = Duration::from_secs(150);
    const WINDOW: Duration = Duration::from_secs(300);

    #[test]
    fn only_a_planned_refresh_of_a_healthy_request_is_routine() {
        assert!(MintReason::Due.is_routine(0));
        assert!(!MintReason::Due.is_routine(1), "a recovery is news");
        for reason in [
            MintReason::NoUrl,
            MintReason::SpecChanged,
            MintReason::RefreshRequested,
        ] {
            assert!(!reason.is_routine(0), "{reason:?}");
        }
    }

    fn stored(expires: &str, generation: i64) -> StoredUrl {
        StoredUrl {
            expires_at: t(expires),
            session_expires_at: None,
            generation: Some(generation),
            metadata_intact: true,
        }
    }

    fn healthy_status(expires: &str, next: &str, generation: i64) -> EmbedUrlRequestStatus {
        EmbedUrlRequestStatus {
            url_expires_at: Some(expires.into()),
            next_refresh_time: Some(next.into()),
            observed_generation: Some(generation),
            consecutive_failures: Some(0),
            ..Default::default()
        }
    }

    fn facts<'a>(
        now: &str,
        status: &'a EmbedUrlRequestStatus,
        stored: Option<&'a StoredUrl>,
    ) -> Facts<'a> {
        Facts {
            now: t(now),
            generation: Some(1),
            refresh_request: None,
            status,
            stored,
            refresh_before: RB,
            window: WINDOW,
        }
    }

    #[test]
    fn new_request_mints() {
        let status = EmbedUrlRequestStatus::default();
        assert_eq!(
            plan(&facts("2026-11-22T10:00:00Z", &status, None)),
            Plan::Mint(MintReason::NoUrl)
        );
    }

    #[test]
    fn fresh_url_waits_until_the_planned_refresh() {
        let status = healthy_status("2026-11-22T10:05:00Z", "2026-11-22T10:02:20Z", 1);
        let url = stored("2026-11-22T10:05:00Z", 1);
        assert_eq!(
            plan(&facts("2026-11-22T10:01:00Z", &status, Some(&url))),
            Plan::Wait {
                until: t("2026-11-22T10:02:20Z")
            }
        );
        assert_eq!(
            plan(&facts("2026-11-22T10:02:20Z", &status, Some(&url))),
            Plan::Mint(MintReason::Due)
        );
    }

    #[test]
    fn a_late_next_refresh_in_status_is_capped_at_use_by_minus_refresh_before() {
        let status = healthy_status("2026-11-22T10:05:00Z", "2026-11-22T10:04:59Z", 1);
        let url = stored("2026-11-22T10:05:00Z", 1);
        assert_eq!(
            plan(&facts("2026-11-22T10:01:00Z", &status, Some(&url))),
            Plan::Wait {
                until: t("2026-11-22T10:02:30Z")
            }
        );
    }

    #[test]
    fn lost_status_write_falls_back_to_the_secret() {
        // The Secret holds a newer URL than the status describes (the operator stopped between
        // the two writes): trust the Secret, do not mint again.
        let status = healthy_status("2026-11-22T10:00:00Z", "2026-11-22T09:57:30Z", 1);
        let url = stored("2026-11-22T10:05:00Z", 1);
        assert_eq!(
            plan(&facts("2026-11-22T10:00:30Z", &status, Some(&url))),
            Plan::Wait {
                until: t("2026-11-22T10:02:30Z")
            }
        );
    }

    #[test]
    fn spec_change_and_refresh_request_mint_at_once() {
        let status = healthy_status("2026-11-22T10:05:00Z", "2026-11-22T10:02:30Z", 1);
        let url = stored("2026-11-22T10:05:00Z", 1);
        let mut f = facts("2026-11-22T10:01:00Z", &status, Some(&url));
        f.generation = Some(2);
        assert_eq!(plan(&f), Plan::Mint(MintReason::SpecChanged));

        let mut f = facts("2026-11-22T10:01:00Z", &status, Some(&url));
        f.refresh_request = Some("2026-11-22T10:00:59Z");
        assert_eq!(plan(&f), Plan::Mint(MintReason::RefreshRequested));

        // Once handled, the same annotation value does nothing.
        let mut handled = status.clone();
        handled.last_handled_refresh_request = Some("2026-11-22T10:00:59Z".into());
        let mut f = facts("2026-11-22T10:01:00Z", &handled, Some(&url));
        f.refresh_request = Some("2026-11-22T10:00:59Z");
        assert_eq!(
            plan(&f),
            Plan::Wait {
                until: t("2026-11-22T10:02:30Z")
            }
        );
    }

    #[test]
    fn deleted_secret_is_restored_at_once_when_healthy() {
        let status = healthy_status("2026-11-22T10:05:00Z", "2026-11-22T10:02:30Z", 1);
        assert_eq!(
            plan(&facts("2026-11-22T10:01:00Z", &status, None)),
            Plan::Mint(MintReason::NoUrl)
        );
    }

    #[test]
    fn backoff_is_honoured_even_without_a_url() {
        let status = EmbedUrlRequestStatus {
            observed_generation: Some(1),
            consecutive_failures: Some(3),
            next_refresh_time: Some("2026-11-22T10:10:00Z".into()),
            ..Default::default()
        };
        assert_eq!(
            plan(&facts("2026-11-22T10:01:00Z", &status, None)),
            Plan::Wait {
                until: t("2026-11-22T10:10:00Z")
            }
        );
        assert_eq!(
            plan(&facts("2026-11-22T10:10:00Z", &status, None)),
            Plan::Mint(MintReason::NoUrl)
        );
        // A spec change cuts the backoff short.
        let mut f = facts("2026-11-22T10:01:00Z", &status, None);
        f.generation = Some(2);
        assert_eq!(plan(&f), Plan::Mint(MintReason::NoUrl));
    }

    #[test]
    fn failed_attempt_after_spec_change_retries_at_backoff_not_at_once() {
        // Spec moved to generation 2, the attempt failed: the Secret still holds generation 1's
        // URL, and the status says the attempt for generation 2 was made.
        let status = EmbedUrlRequestStatus {
            url_expires_at: Some("2026-11-22T10:05:00Z".into()),
            observed_generation: Some(2),
            consecutive_failures: Some(1),
            next_refresh_time: Some("2026-11-22T10:01:02Z".into()),
            ..Default::default()
        };
        let url = stored("2026-11-22T10:05:00Z", 1);
        let mut f = facts("2026-11-22T10:01:01Z", &status, Some(&url));
        f.generation = Some(2);
        assert_eq!(
            plan(&f),
            Plan::Wait {
                until: t("2026-11-22T10:01:02Z")
            }
        );
        f.now = t("2026-11-22T10:01:02Z");
        assert_eq!(plan(&f), Plan::Mint(MintReason::SpecChanged));
    }

    #[test]
    fn jitter_only_brings_the_refresh_forward() {
        let expires = t("2026-11-22T10:05:00Z");
        let latest = planned_refresh(expires, RB, WINDOW, 0.0);
        assert_eq!(latest, t("2026-11-22T10:02:30Z"));
        let earliest = planned_refresh(expires, RB, WINDOW, 1.0);
        assert_eq!(earliest, t("2026-11-22T10:02:15Z"));
        for j in [0.1, 0.5, 0.9, 2.0, -1.0] {
            let r = planned_refresh(expires, RB, WINDOW, j);
            assert!(r <= latest && r >= earliest, "{j}: {}", rfc3339(r));
        }
    }

    #[test]
    fn retryable_backoff_doubles_and_never_passes_the_use_by_time() {
        let now = t("2026-11-22T10:00:00Z");
        let far = Some(t("2026-11-22T11:00:00Z"));
        let delays: Vec<i64> = (1..=5)
            .map(|n| {
                retry_at(now, AwsErrorKind::Throttled, n, far, WINDOW, 0.0)
                    .duration_since(now)
                    .as_secs()
            })
            .collect();
        assert_eq!(delays, vec![1, 2, 4, 8, 16]);
        assert_eq!(
            retry_at(now, AwsErrorKind::Unavailable, 30, far, WINDOW, 0.0),
            t("2026-11-22T10:02:30Z"),
            "capped at half the window (and at five minutes)"
        );
        // URL usable until 10:00:40: retries must come before 10:00:10 (a tenth of the window).
        let soon = Some(t("2026-11-22T10:00:40Z"));
        assert_eq!(
            retry_at(now, AwsErrorKind::Throttled, 10, soon, WINDOW, 0.0),
            t("2026-11-22T10:00:10Z")
        );
        // Already past its last chance: the usual backoff, no hot loop.
        let lapsed = Some(t("2026-11-22T09:00:00Z"));
        assert_eq!(
            retry_at(now, AwsErrorKind::Throttled, 3, lapsed, WINDOW, 0.0),
            t("2026-11-22T10:00:04Z"),
        );
        // Jitter shortens by at most 20% (8 s becomes 6.4 s, stored as 7 s).
        let jittered = retry_at(now, AwsErrorKind::Throttled, 4, far, WINDOW, 1.0);
        assert_eq!(jittered, t("2026-11-22T10:00:07Z"));
    }

    #[test]
    fn a_refresh_before_close_to_the_window_never_plans_a_refresh_before_the_mint() {
        let minted = t("2026-11-22T10:00:00.400Z");
        let expires = url_expires_at(minted, WINDOW);
        for refresh_before in [150, 270, 280, 299] {
            for jitter in [0.0, 0.5, 1.0] {
                let next =
                    planned_refresh(expires, Duration::from_secs(refresh_before), WINDOW, jitter);
                let interval = next.duration_since(minted).as_secs_f64();
                // At most 10 % of the time between refreshes taken off, rounded to the second
                // before; and at least 90 % of 30 s between refreshes, whatever refreshBefore.
                let asked = (300 - refresh_before.min(270)) as f64;
                assert!(
                    interval >= asked * 0.9 - 1.0,
                    "{refresh_before}s, {jitter}: {interval}"
                );
                assert!(interval >= 26.0, "{refresh_before}s, {jitter}: {interval}");
            }
        }
        // The default, half the window, is unchanged: up to 15 s of jitter.
        assert_eq!(
            planned_refresh(expires, RB, WINDOW, 1.0),
            t("2026-11-22T10:02:15Z")
        );
    }

    #[test]
    fn a_throttling_storm_costs_a_handful_of_attempts_per_url_not_one_a_second() {
        // The planned refresh, half a window before the use-by time, fails, and so does every
        // retry. Count the attempts until the URL lapses.
        let expires = t("2026-11-22T10:05:00Z");
        let mut now = t("2026-11-22T10:02:30Z");
        let mut attempts = 0;
        let mut last_chance_tried = false;
        while now < expires {
            attempts += 1;
            let next = retry_at(
                now,
                AwsErrorKind::Throttled,
                attempts,
                Some(expires),
                WINDOW,
                0.0,
            );
            assert!(next > now);
            last_chance_tried |= now == t("2026-11-22T10:04:30Z");
            now = next;
        }
        assert!(last_chance_tried, "the last chance was tried");
        assert!(attempts <= 9, "{attempts} attempts");
        // With jitter, the last chance comes up to a fifth of the window early.
        let now = t("2026-11-22T10:03:00Z");
        let jittered = retry_at(now, AwsErrorKind::Throttled, 9, Some(expires), WINDOW, 1.0);
        assert_eq!(jittered, t("2026-11-22T10:04:00Z"));
    }

    #[test]
    fn times_are_whole_seconds_rounded_to_the_safe_side() {
        // Minted at .9: the URL is usable until .9 past the window, stored as the second before.
        let minted = t("2026-11-22T10:00:00.900Z");
        let expires = url_expires_at(minted, WINDOW);
        assert_eq!(expires, t("2026-11-22T10:05:00Z"));
        assert!(expires <= add(minted, WINDOW));
        // A retry never comes earlier than its delay, so the stored retry time is never already
        // due when the status write's echo is reconciled: no hot loop, even at the 0.5 s floor.
        let now = t("2026-11-22T10:00:00.600Z");
        let retry = retry_at(now, AwsErrorKind::Throttled, 1, None, WINDOW, 0.0);
        assert_eq!(retry, t("2026-11-22T10:00:02Z"));
        // Usable until 10:00:33.2: the last chance, a tenth of the window before, is 10:00:03.2.
        let usable = Some(t("2026-11-22T10:00:33.200Z"));
        let retry = retry_at(now, AwsErrorKind::Throttled, 9, usable, WINDOW, 0.0);
        assert_eq!(
            retry,
            t("2026-11-22T10:00:03Z"),
            "last chance, rounded down"
        );
        let lapsed = Some(t("2026-11-22T10:00:00.700Z"));
        let retry = retry_at(now, AwsErrorKind::Throttled, 9, lapsed, WINDOW, 0.0);
        assert!(retry >= add(now, MIN_RETRY), "{}", rfc3339(retry));
        for time in [expires, retry, planned_refresh(expires, RB, WINDOW, 0.37)] {
            assert_eq!(floor_second(time), time);
        }
    }

    #[test]
    fn rejected_backoff_is_long_and_ignores_the_use_by_time() {
        let now = t("2026-11-22T10:00:00Z");
        let soon = Some(t("2026-11-22T10:00:40Z"));
        assert_eq!(
            retry_at(now, AwsErrorKind::Rejected, 1, soon, WINDOW, 0.0),
            t("2026-11-22T10:05:00Z")
        );
        assert_eq!(
            retry_at(now, AwsErrorKind::Rejected, 10, soon, WINDOW, 0.0),
            t("2026-11-22T11:00:00Z")
        );
    }
}
