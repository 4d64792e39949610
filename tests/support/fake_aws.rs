//! A stand-in for the three AWS APIs, on 127.0.0.1, built on wiremock.
//!
//! It speaks each operation's real wire protocol, so the real `aws-sdk-*` clients talk to it
//! unchanged (only the endpoint URL differs):
//! - QuickSight `GetSessionEmbedUrl`: rest-json, `GET /accounts/{id}/session-embed-url` with the
//!   inputs in the query string, answering `{"EmbedUrl","RequestId"}`;
//! - Q Business `CreateAnonymousWebExperienceUrl`: rest-json,
//!   `POST /applications/{app}/experiences/{exp}/anonymous-url`, answering `{"anonymousUrl"}`;
//! - Kinesis Analytics V2 `CreateApplicationPresignedUrl`: awsJson1.1, `POST /` with
//!   `X-Amz-Target: KinesisAnalytics_20180523.CreateApplicationPresignedUrl`, answering
//!   `{"AuthorizedUrl"}`.
//!
//! Errors use AWS's own shapes: the code in `x-amzn-ErrorType` for the rest-json services, in
//! `__type` for awsJson. Every successful call hands out a new, unique URL. Calls are recorded
//! (inputs, the URL handed out, the signing access key and region) and faults can be injected per
//! service, as can a rate limit above which calls are throttled.

use aws_config::retry::RetryConfig;
use aws_config::{BehaviorVersion, Region};
use aws_credential_types::Credentials;
use embed_url_operator::providers::Service;
use serde_json::{Value, json};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wiremock::matchers::{body_string_contains, header, method, path, path_regex};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

const AWS_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// Access key the default test credentials sign with.
pub const TEST_ACCESS_KEY: &str = "AKIDFAKEOPERATOR";

/// A failure the fake answers with instead of a URL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The service's throttling error (HTTP 429, or 400 `ThrottlingException` for awsJson).
    Throttle,
    /// An internal server error (HTTP 500).
    ServerError,
    /// A permanent refusal: `AccessDeniedException` (QuickSight, Q Business) or
    /// `ResourceNotFoundException` (Flink).
    Reject,
}

/// One request the fake received.
#[derive(Clone, Debug)]
pub struct Call {
    pub service: Service,
    /// Path parameters and query or body inputs, by their wire names.
    pub inputs: HashMap<String, Value>,
    /// Access key id from the SigV4 `Authorization` header.
    pub access_key: Option<String>,
    /// Region from the SigV4 credential scope.
    pub region: Option<String>,
    /// Whether the call was answered with a URL.
    pub succeeded: bool,
    /// When the call arrived.
    pub at: std::time::Instant,
    /// The URL handed out, if the call succeeded.
    pub url: Option<String>,
}

#[derive(Default)]
struct State {
    calls: Mutex<Vec<Call>>,
    /// Faults to answer with, next first, per service.
    queued_faults: Mutex<HashMap<Service, VecDeque<Fault>>>,
    /// A fault answered to every call of a service until cleared.
    standing_faults: Mutex<HashMap<Service, Fault>>,
    latency_ms: AtomicU64,
    issued: AtomicU64,
    /// Form parameters of every STS AssumeRole call.
    sts_calls: Mutex<Vec<HashMap<String, String>>>,
    /// STS calls still to refuse with AccessDenied.
    sts_failures: AtomicU64,
    /// STS calls still to answer with Throttling (checked before `sts_failures`).
    sts_throttles: AtomicU64,
    /// Lifetime of the credentials STS hands out, in seconds (0: one hour).
    sts_lifetime_secs: AtomicU64,
    /// How long STS takes to answer, in milliseconds.
    sts_delay_ms: AtomicU64,
    /// Per-service call rate above which calls are throttled, if any.
    rate_limit: Mutex<Option<RateLimit>>,
}

/// A token bucket: `per_second` tokens a second, at most `burst` saved up.
struct RateLimit {
    per_second: f64,
    burst: f64,
    tokens: HashMap<Service, (f64, std::time::Instant)>,
}

impl RateLimit {
    fn admit(&mut self, service: Service) -> bool {
        let now = std::time::Instant::now();
        let (tokens, last) = self.tokens.entry(service).or_insert((self.burst, now));
        *tokens =
            (*tokens + now.duration_since(*last).as_secs_f64() * self.per_second).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

pub struct FakeAws {
    server: MockServer,
    state: Arc<State>,
}

impl FakeAws {
    pub async fn start() -> Self {
        // Not recording requests: `calls` keeps what tests need, and a long benchmark run would
        // otherwise hold every request in memory twice.
        let server = MockServer::builder()
            .disable_request_recording()
            .start()
            .await;
        let state = Arc::new(State::default());
        Mock::given(method("GET"))
            .and(path_regex(r"^/accounts/[^/]+/session-embed-url$"))
            .respond_with(Responder {
                service: Service::QuickSight,
                state: state.clone(),
            })
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(path_regex(
                r"^/applications/[^/]+/experiences/[^/]+/anonymous-url$",
            ))
            .respond_with(Responder {
                service: Service::QBusiness,
                state: state.clone(),
            })
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(path("/"))
            .and(header(
                "x-amz-target",
                "KinesisAnalytics_20180523.CreateApplicationPresignedUrl",
            ))
            .respond_with(Responder {
                service: Service::Flink,
                state: state.clone(),
            })
            .mount(&server)
            .await;
        // STS (awsQuery): POST / with a form body. Flink also posts to /, but always with its
        // X-Amz-Target header, so the body decides.
        Mock::given(method("POST"))
            .and(path("/"))
            .and(body_string_contains("Action=AssumeRole"))
            .respond_with(StsResponder {
                state: state.clone(),
            })
            .mount(&server)
            .await;
        FakeAws { server, state }
    }

    /// Form parameters of every STS AssumeRole call so far.
    pub fn sts_calls(&self) -> Vec<HashMap<String, String>> {
        self.state.sts_calls.lock().unwrap().clone()
    }

    /// Hands out credentials that expire after `lifetime` (default one hour).
    pub fn set_sts_lifetime(&self, lifetime: Duration) {
        self.state
            .sts_lifetime_secs
            .store(lifetime.as_secs(), Ordering::Relaxed);
    }

    /// Refuses the next `times` AssumeRole calls with `AccessDenied`.
    pub fn fail_sts_next(&self, times: u64) {
        self.state.sts_failures.store(times, Ordering::Relaxed);
    }

    /// STS answers after `delay` from now on (zero: at once).
    pub fn delay_sts(&self, delay: Duration) {
        self.state
            .sts_delay_ms
            .store(u64::try_from(delay.as_millis()).unwrap(), Ordering::Relaxed);
    }

    /// Throttles the next `times` AssumeRole calls (HTTP 400, `Throttling`, as STS does). Each
    /// HTTP attempt counts: the harness's SDK config tries twice.
    pub fn throttle_sts_next(&self, times: u64) {
        self.state.sts_throttles.store(times, Ordering::Relaxed);
    }

    pub fn uri(&self) -> String {
        self.server.uri()
    }

    /// How long the SDK waits for one answer of this fake before giving up (see [`Self::sdk_config`]).
    pub const ATTEMPT_TIMEOUT: Duration = AWS_ATTEMPT_TIMEOUT;

    /// An SDK config pointing every service at this fake, with static credentials, a default
    /// region and quick SDK retries for STS (the mint clients make one attempt, as in production:
    /// `providers::clients::mint_retry_config`), and no
    /// stalled-stream protection, like the operator's.
    pub fn sdk_config(&self) -> aws_config::SdkConfig {
        aws_config::SdkConfig::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(self.uri())
            .credentials_provider(
                aws_credential_types::provider::SharedCredentialsProvider::new(Credentials::new(
                    TEST_ACCESS_KEY,
                    "fake-secret",
                    None,
                    None,
                    "test",
                )),
            )
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(2)
                    .with_initial_backoff(Duration::from_millis(20)),
            )
            // The operator sets 10 s per attempt (src/main.rs); 2 s here lets a test time a
            // call out with `set_latency` quickly.
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .operation_attempt_timeout(AWS_ATTEMPT_TIMEOUT)
                    .build(),
            )
            .sleep_impl(aws_smithy_async::rt::sleep::default_async_sleep().expect("tokio sleep"))
            .time_source(aws_smithy_async::time::SystemTimeSource::new())
            // As the operator configures it (src/main.rs).
            .stalled_stream_protection(
                aws_config::stalled_stream_protection::StalledStreamProtectionConfig::disabled(),
            )
            .build()
    }

    /// Every call received so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.state.calls.lock().unwrap().clone()
    }

    /// Calls received for one service (each HTTP attempt counts).
    pub fn call_count(&self, service: Service) -> usize {
        self.calls().iter().filter(|c| c.service == service).count()
    }

    /// Calls for one service that were answered with a URL.
    pub fn success_count(&self, service: Service) -> usize {
        self.calls()
            .iter()
            .filter(|c| c.service == service && c.succeeded)
            .count()
    }

    /// Answers the next `times` calls of `service` with `fault`.
    pub fn fail_next(&self, service: Service, fault: Fault, times: usize) {
        let mut queued = self.state.queued_faults.lock().unwrap();
        queued
            .entry(service)
            .or_default()
            .extend(std::iter::repeat_n(fault, times));
    }

    /// Answers every call of `service` with `fault` until [`FakeAws::clear_faults`].
    pub fn fail_always(&self, service: Service, fault: Fault) {
        self.state
            .standing_faults
            .lock()
            .unwrap()
            .insert(service, fault);
    }

    pub fn clear_faults(&self) {
        self.state.standing_faults.lock().unwrap().clear();
        self.state.queued_faults.lock().unwrap().clear();
    }

    /// Throttles each service above `per_second` calls a second (a token bucket holding at most
    /// `burst` calls), answering its throttling error as AWS does; `None` lifts the limit.
    pub fn set_rate_limit(&self, limit: Option<(f64, f64)>) {
        *self.state.rate_limit.lock().unwrap() = limit.map(|(per_second, burst)| RateLimit {
            per_second,
            burst: burst.max(1.0),
            tokens: HashMap::new(),
        });
    }

    /// Delays every answer by `latency`.
    pub fn set_latency(&self, latency: Duration) {
        self.state
            .latency_ms
            .store(latency.as_millis() as u64, Ordering::Relaxed);
    }
}

struct Responder {
    service: Service,
    state: Arc<State>,
}

impl Respond for Responder {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let inputs = inputs_of(self.service, request);
        let (access_key, region) = signing_scope(request);
        let at = std::time::Instant::now();
        let fault = self.next_fault().or_else(|| {
            let mut limit = self.state.rate_limit.lock().unwrap();
            let over = limit.as_mut().is_some_and(|l| !l.admit(self.service));
            over.then_some(Fault::Throttle)
        });
        let delay = Duration::from_millis(self.state.latency_ms.load(Ordering::Relaxed));
        let url = fault.is_none().then(|| {
            let n = self.state.issued.fetch_add(1, Ordering::Relaxed) + 1;
            format!(
                "https://{}.fake.test/sign-in/{n}?code=secret-{n}-{:x}",
                self.service.name().to_lowercase(),
                rand::random::<u64>()
            )
        });
        let response = match (fault, &url) {
            (Some(fault), _) => error_response(self.service, fault),
            (None, url) => success_response(self.service, url.as_deref().unwrap_or_default()),
        };
        self.state.calls.lock().unwrap().push(Call {
            service: self.service,
            inputs,
            access_key,
            region,
            succeeded: fault.is_none(),
            at,
            url,
        });
        response.set_delay(delay)
    }
}

impl Responder {
    fn next_fault(&self) -> Option<Fault> {
        if let Some(fault) = self
            .state
            .standing_faults
            .lock()
            .unwrap()
            .get(&self.service)
        {
            return Some(*fault);
        }
        self.state
            .queued_faults
            .lock()
            .unwrap()
            .get_mut(&self.service)
            .and_then(VecDeque::pop_front)
    }
}

/// Takes one from a counter of calls still to fail; false when none are left.
fn take_one(left: &AtomicU64) -> bool {
    left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok()
}

/// An STS (awsQuery) error answer.
fn sts_error(status: u16, code: &str, message: &str) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_raw(
        format!(
            "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><Error><Type>Sender</Type>\
             <Code>{code}</Code><Message>{message}</Message>\
             </Error><RequestId>req-fake</RequestId></ErrorResponse>"
        ),
        "text/xml",
    )
}

/// Access key ids the fake STS hands out start with this.
pub const ASSUMED_ACCESS_KEY_PREFIX: &str = "ASIAFAKEASSUMED";

struct StsResponder {
    state: Arc<State>,
}

impl Respond for StsResponder {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let delay = Duration::from_millis(self.state.sts_delay_ms.load(Ordering::Relaxed));
        self.answer(request).set_delay(delay)
    }
}

impl StsResponder {
    fn answer(&self, request: &Request) -> ResponseTemplate {
        let body = String::from_utf8_lossy(&request.body);
        // Parse the form body with the URL parser wiremock already uses for query strings.
        let form: HashMap<String, String> = request
            .url
            .join(&format!("/?{body}"))
            .map(|u| u.query_pairs().into_owned().collect())
            .unwrap_or_default();
        let n = {
            let mut calls = self.state.sts_calls.lock().unwrap();
            calls.push(form);
            calls.len()
        };
        if take_one(&self.state.sts_throttles) {
            return sts_error(400, "Throttling", "Rate exceeded");
        }
        if take_one(&self.state.sts_failures) {
            return sts_error(
                403,
                "AccessDenied",
                "User is not authorized to perform: sts:AssumeRole",
            );
        }
        let lifetime = match self.state.sts_lifetime_secs.load(Ordering::Relaxed) {
            0 => 3600,
            secs => secs as i64,
        };
        let expiration = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(lifetime);
        ResponseTemplate::new(200).set_body_raw(
            format!(
                "<AssumeRoleResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><AssumeRoleResult>\
                 <Credentials><AccessKeyId>{ASSUMED_ACCESS_KEY_PREFIX}{n}</AccessKeyId>\
                 <SecretAccessKey>assumed-secret</SecretAccessKey><SessionToken>assumed-token</SessionToken>\
                 <Expiration>{}</Expiration></Credentials>\
                 <AssumedRoleUser><AssumedRoleId>AROAFAKE:session</AssumedRoleId>\
                 <Arn>arn:aws:sts::111122223333:assumed-role/embed/session</Arn></AssumedRoleUser>\
                 </AssumeRoleResult><ResponseMetadata><RequestId>req-fake</RequestId></ResponseMetadata>\
                 </AssumeRoleResponse>",
                expiration.strftime("%Y-%m-%dT%H:%M:%SZ")
            ),
            "text/xml",
        )
    }
}

fn inputs_of(service: Service, request: &Request) -> HashMap<String, Value> {
    let mut inputs = HashMap::new();
    let segments: Vec<&str> = request.url.path().split('/').collect();
    match service {
        Service::QuickSight => {
            inputs.insert("AwsAccountId".into(), json!(segments.get(2)));
            for (key, value) in request.url.query_pairs() {
                inputs.insert(key.into_owned(), json!(value.into_owned()));
            }
        }
        Service::QBusiness => {
            inputs.insert("applicationId".into(), json!(segments.get(2)));
            inputs.insert("webExperienceId".into(), json!(segments.get(4)));
        }
        Service::Flink => {}
    }
    if let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(&request.body) {
        inputs.extend(body);
    }
    inputs
}

/// Access key and region from `Authorization: AWS4-HMAC-SHA256 Credential=AKID/date/region/service/aws4_request, ...`.
fn signing_scope(request: &Request) -> (Option<String>, Option<String>) {
    let Some(auth) = request
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
    else {
        return (None, None);
    };
    let Some(credential) = auth.split("Credential=").nth(1) else {
        return (None, None);
    };
    let mut parts = credential.split(',').next().unwrap_or_default().split('/');
    let access_key = parts.next().map(str::to_string);
    let region = parts.nth(1).map(str::to_string);
    (access_key, region)
}

fn success_response(service: Service, url: &str) -> ResponseTemplate {
    match service {
        Service::QuickSight => ResponseTemplate::new(200).set_body_raw(
            json!({"EmbedUrl": url, "RequestId": "req-fake", "Status": 200}).to_string(),
            "application/json",
        ),
        Service::QBusiness => ResponseTemplate::new(200)
            .set_body_raw(json!({"anonymousUrl": url}).to_string(), "application/json"),
        Service::Flink => ResponseTemplate::new(200).set_body_raw(
            json!({"AuthorizedUrl": url}).to_string(),
            "application/x-amz-json-1.1",
        ),
    }
}

fn error_response(service: Service, fault: Fault) -> ResponseTemplate {
    let (status, code, message) = match (service, fault) {
        (_, Fault::Throttle) if service == Service::Flink => {
            (400, "ThrottlingException", "Rate exceeded")
        }
        (_, Fault::Throttle) => (429, "ThrottlingException", "Rate exceeded"),
        (Service::QuickSight, Fault::ServerError) => {
            (500, "InternalFailureException", "internal failure")
        }
        (Service::QBusiness, Fault::ServerError) => {
            (500, "InternalServerException", "internal error")
        }
        (Service::Flink, Fault::ServerError) => (500, "InternalFailure", "internal failure"),
        (Service::QuickSight, Fault::Reject) => (
            401,
            "AccessDeniedException",
            "not authorized to GetSessionEmbedUrl",
        ),
        (Service::QBusiness, Fault::Reject) => (403, "AccessDeniedException", "not authorized"),
        (Service::Flink, Fault::Reject) => (
            400,
            "ResourceNotFoundException",
            "Application orders not found",
        ),
    };
    match service {
        // rest-json: code in x-amzn-ErrorType; QuickSight capitalises "Message".
        Service::QuickSight => ResponseTemplate::new(status)
            .insert_header(
                "x-amzn-ErrorType",
                format!("{code}:http://internal.amazon.com/coral/com.amazonaws.quicksight/"),
            )
            .insert_header("x-amzn-RequestId", "req-fake")
            .set_body_raw(
                json!({"Message": message, "RequestId": "req-fake"}).to_string(),
                "application/json",
            ),
        Service::QBusiness => ResponseTemplate::new(status)
            .insert_header("x-amzn-ErrorType", code)
            .set_body_raw(json!({"message": message}).to_string(), "application/json"),
        // awsJson1.1: code in __type.
        Service::Flink => ResponseTemplate::new(status).set_body_raw(
            json!({"__type": code, "message": message}).to_string(),
            "application/x-amz-json-1.1",
        ),
    }
}
