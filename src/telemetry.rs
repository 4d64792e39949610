//! Logs and Prometheus metrics.
//!
//! No metric label and no log field ever carries a URL or a user ARN: labels are limited to
//! namespace, name, service, operation, outcome and error reason.

use crate::providers::{AwsCallError, AwsErrorKind, Service};
use crate::status::reasons::ReadyReason;
use jiff::Timestamp;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeLabelValue, EncodeMetric,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global tracing subscriber. `filter` uses `RUST_LOG` syntax.
///
/// Whatever the filter says, TRACE output of the AWS SDK is dropped: at that level the SDK logs
/// response bodies and deserialized outputs, and for Q Business and Flink those contain the URL
/// unredacted (only QuickSight marks it sensitive).
pub fn init_logging(format: LogFormat, filter: &str) -> Result<(), String> {
    use tracing_subscriber::filter::{FilterExt, filter_fn};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer};

    let filter =
        EnvFilter::try_new(filter).map_err(|e| format!("invalid log filter {filter:?}: {e}"))?;
    // The hint lets `And` keep the EnvFilter's most verbose level as the subscriber's, so a
    // disabled `debug!` costs one comparison (without it the combined hint is "unknown").
    let filter = filter.and(
        filter_fn(|meta| !may_carry_urls(meta.level(), meta.target()))
            .with_max_level_hint(tracing_subscriber::filter::LevelFilter::TRACE),
    );
    let layer = match format {
        // Colours only on a terminal, and not with NO_COLOR: in a pod, `kubectl logs` and log
        // shippers would show the escape codes as text.
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_target(false)
            .with_ansi(
                std::io::IsTerminal::is_terminal(&std::io::stdout())
                    && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
            )
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_target(false)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(layer.with_filter(filter))
        .try_init()
        .map_err(|e| format!("could not install the logger: {e}"))
}

/// Whether a log target and level may print a URL: the AWS SDK's TRACE output.
pub fn may_carry_urls(level: &tracing::Level, target: &str) -> bool {
    *level == tracing::Level::TRACE
        && ["aws_smithy", "aws_sdk", "aws_config", "aws_runtime"]
            .iter()
            .any(|prefix| target.starts_with(prefix))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
enum Outcome {
    Success,
    Throttled,
    Unavailable,
    Rejected,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AwsCallLabels {
    service: String,
    operation: String,
    outcome: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AwsOperationLabels {
    service: String,
    operation: String,
}

/// Every metric the operator exports, prefixed `embedurl_`.
pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    reconcile_errors: Family<ErrorLabels, Counter>,
    reconcile_duration: Histogram,
    aws_calls: Family<AwsCallLabels, Counter>,
    aws_call_duration: Family<AwsOperationLabels, Histogram>,
    requests: Arc<RequestSeries>,
    refresh_lateness: Histogram,
    rate_limit_wait: Family<ServiceLabels, Histogram>,
    required_rate: Family<ServiceLabels, Gauge<f64, AtomicU64>>,
    configured_rate: Gauge<f64, AtomicU64>,
    reconciles_due: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("embedurl");
        let reconciles = Counter::default();
        registry.register("reconciles", "Reconciles started", reconciles.clone());
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by reason",
            reconcile_errors.clone(),
        );
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile, AWS call included",
            reconcile_duration.clone(),
        );
        let aws_calls = Family::<AwsCallLabels, Counter>::default();
        registry.register(
            "aws_calls",
            "AWS calls that mint a URL, by service, operation and outcome",
            aws_calls.clone(),
        );
        let aws_call_duration =
            Family::<AwsOperationLabels, Histogram>::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.005, 2.0, 14))
            });
        registry.register(
            "aws_call_duration_seconds",
            "Duration of AWS calls that mint a URL",
            aws_call_duration.clone(),
        );
        let requests = Arc::new(RequestSeries::default());
        registry.register_collector(Box::new(requests.clone()));
        let refresh_lateness = Histogram::new([
            -10.0, -1.0, -0.1, 0.0, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
        ]);
        registry.register(
            "refresh_lateness_seconds",
            "Actual minus planned time of scheduled refreshes (negative: early)",
            refresh_lateness.clone(),
        );
        let rate_limit_wait = Family::<ServiceLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([0.0, 0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0])
        });
        registry.register(
            "aws_rate_limit_wait_seconds",
            "Time mint calls waited for the client-side AWS rate limit",
            rate_limit_wait.clone(),
        );
        let required_rate = Family::<ServiceLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "aws_required_calls_per_second",
            "Mint calls per second the current requests need, in the busiest rate-limit bucket (region and IAM identity) of the service (each request: 1 / (window - 1.1 x refreshBefore), its soonest refresh interval)",
            required_rate.clone(),
        );
        let configured_rate = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "aws_rate_limit_calls_per_second",
            "Configured client-side AWS rate per (service, region, identity); 0 = unlimited",
            configured_rate.clone(),
        );
        let reconciles_due = Gauge::default();
        registry.register(
            "reconciles_due",
            "Requests due for a reconcile that wait for one of the --concurrency slots, or for room in a full AWS rate-limit line",
            reconciles_due.clone(),
        );
        Metrics {
            registry,
            reconciles_due,
            rate_limit_wait,
            required_rate,
            configured_rate,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            aws_calls,
            aws_call_duration,
            requests,
            refresh_lateness,
        }
    }

    /// Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn reconcile_started(&self) -> ReconcileTimer<'_> {
        self.reconciles.inc();
        ReconcileTimer {
            metrics: self,
            started: Instant::now(),
        }
    }

    pub fn aws_call_started(&self, service: Service) -> AwsCallTimer<'_> {
        AwsCallTimer {
            metrics: self,
            service,
            started: Instant::now(),
        }
    }

    /// Counts a reconcile that could not do its work, by `reason`: most end in an error the
    /// controller retries (`kube_api`); `secret_refused` ends in a status that says so.
    pub fn count_reconcile_error(&self, reason: &str) {
        self.reconcile_errors
            .get_or_create(&ErrorLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn observe_rate_limit_wait(&self, service: Service, waited: std::time::Duration) {
        self.rate_limit_wait
            .get_or_create(&ServiceLabels {
                service: service.name().to_string(),
            })
            .observe(waited.as_secs_f64());
    }

    /// How many requests are due and wait for a slot (see `work_queue`).
    pub fn set_reconciles_due(&self, due: usize) {
        self.reconciles_due
            .set(i64::try_from(due).unwrap_or(i64::MAX));
    }

    pub fn set_rate_capacity(&self, service: Service, required: f64, configured: f64) {
        self.required_rate
            .get_or_create(&ServiceLabels {
                service: service.name().to_string(),
            })
            .set(required);
        self.configured_rate.set(configured);
    }

    pub fn observe_refresh_lateness(&self, actual: Timestamp, planned: Timestamp) {
        let lateness = actual.duration_since(planned).as_secs_f64();
        self.refresh_lateness.observe(lateness);
    }

    /// Records the schedule of one request.
    pub fn set_schedule(
        &self,
        namespace: &str,
        name: &str,
        service: Service,
        url_expiry: Option<Timestamp>,
        next_refresh: Option<Timestamp>,
        ready: Ready,
    ) {
        let values = RequestValues {
            service,
            url_expiry: url_expiry.map(unix_seconds),
            next_refresh: next_refresh.map(unix_seconds),
            ready,
        };
        let mut by_namespace = self.requests.lock();
        match by_namespace
            .get_mut(namespace)
            .and_then(|names| names.get_mut(name))
        {
            Some(current) => *current = values,
            None => {
                by_namespace
                    .entry(namespace.into())
                    .or_default()
                    .insert(name.into(), values);
            }
        }
    }

    /// Keeps the per-request series only of the requests `exists` says are still there, among
    /// those `in_scope` (a watch relisted: deletions during its gap were never reported).
    pub fn retain_requests(
        &self,
        in_scope: impl Fn(&str) -> bool,
        exists: impl Fn(&str, &str) -> bool,
    ) {
        let mut by_namespace = self.requests.lock();
        by_namespace.retain(|namespace, names| {
            if in_scope(namespace) {
                names.retain(|name, _| exists(namespace, name));
            }
            !names.is_empty()
        });
    }

    /// Drops the per-request series of a request that no longer exists.
    pub fn forget_request(&self, namespace: &str, name: &str) {
        let mut by_namespace = self.requests.lock();
        if let Some(names) = by_namespace.get_mut(namespace) {
            names.remove(name);
            if names.is_empty() {
                by_namespace.remove(namespace);
            }
        }
    }
}

/// The per-request series (use-by time, next refresh, ready), one entry per request.
///
/// Three metric families with `namespace`, `name` and `service` labels would keep the labels
/// three times per request, each a map entry with three strings; at 10,000 requests that is most
/// of the operator's metrics memory. Here a request is one small entry, encoded as the same three
/// families on each scrape.
#[derive(Debug, Default)]
struct RequestSeries {
    by_namespace: Mutex<ByNamespace>,
}

/// Namespace -> request name -> the request's values.
type ByNamespace = HashMap<Box<str>, HashMap<Box<str>, RequestValues>>;

#[derive(Clone, Copy, Debug)]
struct RequestValues {
    service: Service,
    url_expiry: Option<f64>,
    next_refresh: Option<f64>,
    ready: Ready,
}

/// A request's `Ready` condition, as `embedurl_ready` exports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ready {
    /// The condition's status is `True`.
    pub is_true: bool,
    /// The condition's reason, one of a fixed set (`status::reasons::READY`), so that alerts can
    /// leave out requests halted on purpose (`Suspended`) without a series per reason.
    pub reason: ReadyReason,
}

impl RequestSeries {
    fn lock(&self) -> MutexGuard<'_, ByNamespace> {
        // The map holds plain values: one left by a panicking holder is still consistent.
        self.by_namespace
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Encodes one family: `value` picks the series' value of a request (`None`: no series),
    /// `with_reason` adds the `Ready` condition's reason as a label.
    fn encode_family<N: EncodeGaugeValue>(
        &self,
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        with_reason: bool,
        value: impl Fn(&RequestValues) -> Option<N>,
    ) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (namespace, names) in self.lock().iter() {
            for (request, values) in names {
                let Some(value) = value(values) else {
                    continue;
                };
                let labels = [
                    ("namespace", &**namespace),
                    ("name", &**request),
                    ("service", values.service.name()),
                    ("reason", values.ready.reason.as_str()),
                ];
                let labels = if with_reason {
                    &labels[..]
                } else {
                    &labels[..3]
                };
                ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

impl Collector for RequestSeries {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.encode_family(
            &mut encoder,
            "url_expiry_timestamp_seconds",
            "Use-by time of the URL in each request's Secret (Unix seconds)",
            false,
            |v| v.url_expiry,
        )?;
        self.encode_family(
            &mut encoder,
            "next_refresh_timestamp_seconds",
            "When each request is next refreshed or retried (Unix seconds)",
            false,
            |v| v.next_refresh,
        )?;
        self.encode_family(
            &mut encoder,
            "ready",
            "1 when the request's Secret holds a usable URL, else 0; reason: its Ready condition's",
            true,
            |v| Some(i64::from(v.ready.is_true)),
        )
    }
}

fn unix_seconds(t: Timestamp) -> f64 {
    t.as_millisecond() as f64 / 1000.0
}

/// Measures one reconcile; call [`ReconcileTimer::finish`] with its error label, if any.
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    started: Instant,
}

impl ReconcileTimer<'_> {
    pub fn finish(self, error: Option<&'static str>) {
        self.metrics
            .reconcile_duration
            .observe(self.started.elapsed().as_secs_f64());
        if let Some(reason) = error {
            self.metrics.count_reconcile_error(reason);
        }
    }
}

/// Measures one AWS call; call [`AwsCallTimer::finish`] with the error kind, if any.
pub struct AwsCallTimer<'a> {
    metrics: &'a Metrics,
    service: Service,
    started: Instant,
}

impl AwsCallTimer<'_> {
    /// Records the call under the operation that failed (`AssumeRole` when the policy's role could
    /// not be assumed, so no mint was attempted), or the service's mint operation.
    pub fn finish(self, error: Option<&AwsCallError>) {
        let outcome = match error.map(|e| e.kind) {
            None => Outcome::Success,
            Some(AwsErrorKind::Throttled) => Outcome::Throttled,
            Some(AwsErrorKind::Unavailable) => Outcome::Unavailable,
            Some(AwsErrorKind::Rejected) => Outcome::Rejected,
        };
        let service = self.service.name().to_string();
        let operation = error
            .map_or(self.service.operation(), |e| e.operation)
            .to_string();
        self.metrics
            .aws_call_duration
            .get_or_create(&AwsOperationLabels {
                service: service.clone(),
                operation: operation.clone(),
            })
            .observe(self.started.elapsed().as_secs_f64());
        self.metrics
            .aws_calls
            .get_or_create(&AwsCallLabels {
                service,
                operation,
                outcome,
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdk_trace_output_is_never_logged() {
        assert!(may_carry_urls(
            &tracing::Level::TRACE,
            "aws_smithy_runtime::client::orchestrator"
        ));
        assert!(may_carry_urls(
            &tracing::Level::TRACE,
            "aws_sdk_kinesisanalyticsv2"
        ));
        assert!(!may_carry_urls(
            &tracing::Level::DEBUG,
            "aws_smithy_runtime"
        ));
        assert!(!may_carry_urls(
            &tracing::Level::TRACE,
            "embed_url_operator::reconciler"
        ));
    }

    #[test]
    fn exports_prefixed_metrics_without_secrets() {
        let metrics = Metrics::new();
        metrics.reconcile_started().finish(Some("kube_api"));
        metrics.aws_call_started(Service::Flink).finish(None);
        let throttled = AwsCallError {
            operation: Service::Flink.operation(),
            kind: AwsErrorKind::Throttled,
            code: "ThrottlingException".into(),
            message: String::new(),
        };
        metrics
            .aws_call_started(Service::Flink)
            .finish(Some(&throttled));
        let sts_refused = AwsCallError {
            operation: "AssumeRole",
            kind: AwsErrorKind::Rejected,
            code: "AccessDenied".into(),
            message: String::new(),
        };
        metrics
            .aws_call_started(Service::Flink)
            .finish(Some(&sts_refused));
        let t: Timestamp = "2026-11-22T10:05:00Z".parse().unwrap();
        metrics.set_schedule(
            "analytics",
            "sales",
            Service::QuickSight,
            Some(t),
            Some(t),
            ready(),
        );
        let text = metrics.encode();
        assert!(text.contains("embedurl_reconciles_total 1"), "{text}");
        assert!(
            text.contains("embedurl_reconcile_errors_total{reason=\"kube_api\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "embedurl_aws_calls_total{service=\"Flink\",operation=\"CreateApplicationPresignedUrl\",outcome=\"Throttled\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "embedurl_aws_calls_total{service=\"Flink\",operation=\"AssumeRole\",outcome=\"Rejected\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("embedurl_url_expiry_timestamp_seconds{namespace=\"analytics\",name=\"sales\",service=\"QuickSight\"} 1795341900.0"),
            "{text}"
        );
        metrics.forget_request("analytics", "sales");
        assert!(!metrics.encode().contains("name=\"sales\""));
    }

    fn ready() -> Ready {
        Ready {
            is_true: true,
            reason: ReadyReason::of("UrlReady"),
        }
    }

    #[test]
    fn per_request_series_follow_the_latest_schedule() {
        let metrics = Metrics::new();
        let t: Timestamp = "2026-11-22T10:05:00Z".parse().unwrap();
        metrics.set_schedule("a", "one", Service::QuickSight, Some(t), Some(t), ready());
        metrics.set_schedule("a", "two", Service::QBusiness, Some(t), Some(t), ready());
        // The spec moved to another service and the URL is gone: one series set, no stale ones.
        let throttled = Ready {
            is_true: false,
            reason: ReadyReason::of("AwsThrottled"),
        };
        metrics.set_schedule("a", "one", Service::Flink, None, Some(t), throttled);
        let text = metrics.encode();
        assert!(text.contains("# TYPE embedurl_ready gauge"), "{text}");
        assert!(
            text.contains("embedurl_ready{namespace=\"a\",name=\"one\",service=\"Flink\",reason=\"AwsThrottled\"} 0\n"),
            "{text}"
        );
        // Only `embedurl_ready` has the reason.
        assert_eq!(text.matches("reason=\"AwsThrottled\"").count(), 1, "{text}");
        assert!(
            text.contains("embedurl_next_refresh_timestamp_seconds{namespace=\"a\",name=\"one\",service=\"Flink\"} 1795341900.0"),
            "{text}"
        );
        assert!(!text.contains("service=\"QuickSight\""), "{text}");
        assert!(
            !text.contains("embedurl_url_expiry_timestamp_seconds{namespace=\"a\",name=\"one\""),
            "{text}"
        );
        assert!(
            text.contains("embedurl_ready{namespace=\"a\",name=\"two\",service=\"QBusiness\",reason=\"UrlReady\"} 1\n"),
            "{text}"
        );
        metrics.forget_request("a", "one");
        metrics.forget_request("a", "two");
        assert!(!metrics.encode().contains("namespace=\"a\""));
    }
}
