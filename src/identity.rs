//! The AWS identities the operator mints with: its own, or a role a policy names.
//!
//! For a role, the operator calls STS AssumeRole from its own credentials, with the policy's
//! external ID, a session named `embedurl-<namespace>-<policy>` and session tags
//! `kubernetes-namespace` and `embedurl-policy`, so IAM and CloudTrail can scope and attribute
//! calls by tenant. One set of clients exists per (role, external ID, region, namespace, policy),
//! built once and shared by all the requests it serves; its credentials are cached and renewed
//! five minutes before they expire, so steady refreshing makes no STS calls.

use crate::policy::RoleToAssume;
use crate::providers::{AwsCallError, AwsErrorKind, Providers};
use crate::recent::RecentlyUsed;
use aws_config::identity::IdentityCache;
use aws_config::{Region, SdkConfig};
use aws_credential_types::Credentials;
use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider, future};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// STS limits role session names to 64 characters.
const MAX_SESSION_NAME: usize = 64;
/// How many assumed-role identities the process keeps: far more than the (role, region,
/// namespace, policy) combinations a cluster uses, but a bound, since a request's region is the
/// tenant's choice. Past it, the least recently used identity is dropped (its next use assumes
/// the role again).
pub const MAX_ASSUMED_IDENTITIES: usize = 4096;
/// How many regions one tenant's (role, namespace, policy) keeps identities for. A tenant naming
/// ever new regions drops its own least recently used ones, never another tenant's.
pub const MAX_REGIONS_PER_TENANT: usize = 64;
/// Assumed credentials are renewed this long before they expire.
const RENEW_BEFORE: Duration = Duration::from_secs(5 * 60);

/// Who the operator is to AWS for one request.
#[derive(Clone)]
pub struct Identity {
    pub providers: Providers,
    /// Set when the identity is an assumed role: resolve it first, so an STS failure is reported
    /// as one.
    pub assumed: Option<Arc<AssumedRole>>,
}

/// All the AWS clients of the process.
pub struct AwsClients {
    base: SdkConfig,
    own: Identity,
    roles: Mutex<RecentlyUsed<RoleKey, Identity>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct RoleKey {
    role: RoleToAssume,
    region: String,
    namespace: String,
    policy: String,
}

impl AwsClients {
    /// `base` carries the operator's own credentials chain, retry, timeouts and endpoints.
    pub fn new(base: SdkConfig) -> Self {
        let own = Identity {
            providers: Providers::from_sdk_config(&base),
            assumed: None,
        };
        AwsClients {
            base,
            own,
            roles: Mutex::new(RecentlyUsed::default()),
        }
    }

    /// The operator's own identity.
    pub fn own(&self) -> Identity {
        self.own.clone()
    }

    /// The identity of `role`, assumed for requests of `namespace` served by `policy` in `region`.
    pub fn assumed(
        &self,
        role: &RoleToAssume,
        region: &str,
        namespace: &str,
        policy: &str,
    ) -> Identity {
        let key = RoleKey {
            role: role.clone(),
            region: region.to_string(),
            namespace: namespace.to_string(),
            policy: policy.to_string(),
        };
        let mut roles = self
            .roles
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(identity) = roles.get(&key) {
            return identity.clone();
        }
        let same_tenant = |other: &RoleKey| {
            other.role == key.role && other.namespace == key.namespace && other.policy == key.policy
        };
        if roles.keys().filter(|other| same_tenant(other)).count() >= MAX_REGIONS_PER_TENANT {
            roles.evict_least_recent(same_tenant);
        } else if roles.len() >= MAX_ASSUMED_IDENTITIES {
            roles.evict_least_recent(|_| true);
        }
        let assumed = Arc::new(AssumedRole::new(
            &self.base, role, region, namespace, policy,
        ));
        let provider: Arc<dyn ProvideCredentials> = assumed.clone();
        let config = self
            .base
            .to_builder()
            .credentials_provider(SharedCredentialsProvider::new(provider))
            // AssumedRole caches itself; a second cache on top would only add latency.
            .identity_cache(IdentityCache::no_cache())
            .build();
        let identity = Identity {
            providers: Providers::from_sdk_config(&config),
            assumed: Some(assumed),
        };
        roles.insert(key, identity.clone());
        identity
    }

    /// How many assumed-role identities exist (for tests and diagnostics).
    pub fn assumed_count(&self) -> usize {
        self.roles.lock().map(|r| r.len()).unwrap_or_default()
    }
}

/// Credentials of an assumed role, cached until shortly before they expire.
pub struct AssumedRole {
    sts: aws_sdk_sts::Client,
    role_arn: String,
    external_id: Option<String>,
    session_name: String,
    tags: Vec<(String, String)>,
    /// What STS last handed out; read without waiting for a renewal in progress.
    issued: std::sync::Mutex<Option<CachedCredentials>>,
    /// Held while calling STS, so that concurrent callers wait for one call; the last failure.
    renewal: tokio::sync::Mutex<Option<(AwsCallError, std::time::Instant)>>,
}

/// How long a failed AssumeRole answers for everyone who was waiting for it: the requests
/// queued behind one STS call that timed out (30 s) would otherwise each make their own, one
/// after the other, and hold their reconciles meanwhile. Short enough that a request's own
/// retry (a second later at the soonest) asks STS again.
const FAILURE_SHARED_FOR: Duration = Duration::from_millis(500);

/// How long after a failed renewal the next is tried while the credentials in hand are still
/// valid: each try may take an STS timeout (30 s), during which the mint that makes it waits.
const RENEWAL_RETRY: Duration = Duration::from_secs(30);

struct CachedCredentials {
    credentials: Credentials,
    /// When to fetch new ones: [`RENEW_BEFORE`] ahead of the expiry, but not before half the
    /// lifetime has passed (for short-lived credentials).
    renew_at: SystemTime,
}

fn lock_issued(
    issued: &std::sync::Mutex<Option<CachedCredentials>>,
) -> std::sync::MutexGuard<'_, Option<CachedCredentials>> {
    // Plain data: still usable after a panic elsewhere.
    issued
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl CachedCredentials {
    /// Whether AWS still accepts them at `now` (credentials without an expiry always).
    fn valid_at(&self, now: SystemTime) -> bool {
        self.credentials.expiry().is_none_or(|expiry| now < expiry)
    }

    fn new(credentials: Credentials, fetched_at: SystemTime) -> Self {
        let renew_at = match credentials.expiry() {
            None => SystemTime::UNIX_EPOCH + Duration::from_secs(u64::MAX / 4),
            Some(expiry) => {
                let lifetime = expiry.duration_since(fetched_at).unwrap_or_default();
                let margin_before_expiry = expiry.checked_sub(RENEW_BEFORE).unwrap_or(fetched_at);
                margin_before_expiry.max(fetched_at + lifetime / 2)
            }
        };
        CachedCredentials {
            credentials,
            renew_at,
        }
    }
}

impl AssumedRole {
    pub fn role_arn(&self) -> &str {
        &self.role_arn
    }

    fn new(
        base: &SdkConfig,
        role: &RoleToAssume,
        region: &str,
        namespace: &str,
        policy: &str,
    ) -> Self {
        let sts_config = aws_sdk_sts::config::Builder::from(base)
            .region(Region::new(region.to_string()))
            .build();
        AssumedRole {
            sts: aws_sdk_sts::Client::from_conf(sts_config),
            role_arn: role.role_arn.clone(),
            external_id: role.external_id.clone(),
            session_name: session_name(namespace, policy),
            tags: vec![
                ("kubernetes-namespace".to_string(), namespace.to_string()),
                ("embedurl-policy".to_string(), policy.to_string()),
            ],
            issued: std::sync::Mutex::new(None),
            renewal: tokio::sync::Mutex::new(None),
        }
    }

    /// Cached credentials, or new ones from STS when they are missing or about to expire. The
    /// lock makes concurrent requests wait for one STS call instead of each making its own, and
    /// a failure answers those waiting for a moment ([`FAILURE_SHARED_FOR`]). Credentials due
    /// for renewal but still valid are used while someone else renews them, and after a failed
    /// renewal until the next try ([`RENEWAL_RETRY`]): an STS outage then stalls no mint.
    pub async fn credentials(&self) -> Result<Credentials, AwsCallError> {
        let still_valid = {
            let issued = lock_issued(&self.issued);
            let now = SystemTime::now();
            match issued.as_ref() {
                Some(entry) if now < entry.renew_at => return Ok(entry.credentials.clone()),
                Some(entry) if entry.valid_at(now) => Some(entry.credentials.clone()),
                _ => None,
            }
        };
        let mut renewal = match self.renewal.try_lock() {
            Ok(guard) => guard,
            Err(_) => match &still_valid {
                Some(valid) => return Ok(valid.clone()),
                None => self.renewal.lock().await,
            },
        };
        // The call this one waited for may have brought new credentials.
        if let Some(entry) = lock_issued(&self.issued).as_ref()
            && SystemTime::now() < entry.renew_at
        {
            return Ok(entry.credentials.clone());
        }
        if let Some((error, at)) = renewal.as_ref() {
            let retry_after = if still_valid.is_some() {
                RENEWAL_RETRY
            } else {
                FAILURE_SHARED_FOR
            };
            if at.elapsed() < retry_after {
                return still_valid.ok_or_else(|| error.clone());
            }
        }
        let fetched_at = SystemTime::now();
        // Counted as failed until it answers: if this caller goes away mid-call (its reconcile
        // cancelled at shutdown, or the SDK's attempt timeout while it signs), the next callers
        // do not each start another STS call at once.
        *renewal = Some((
            AwsCallError {
                operation: "AssumeRole",
                kind: AwsErrorKind::Unavailable,
                code: "Abandoned".to_string(),
                message: "an AssumeRole call was given up before STS answered".to_string(),
            },
            std::time::Instant::now(),
        ));
        match self.assume_role().await {
            Ok(credentials) => {
                *lock_issued(&self.issued) =
                    Some(CachedCredentials::new(credentials.clone(), fetched_at));
                *renewal = None;
                Ok(credentials)
            }
            Err(error) => {
                *renewal = Some((error.clone(), std::time::Instant::now()));
                // The call may have taken long: only credentials still valid now.
                still_valid
                    .filter(|c| c.expiry().is_none_or(|e| SystemTime::now() < e))
                    .ok_or(error)
            }
        }
    }

    async fn assume_role(&self) -> Result<Credentials, AwsCallError> {
        let tags = self
            .tags
            .iter()
            .filter_map(|(k, v)| {
                aws_sdk_sts::types::Tag::builder()
                    .key(k)
                    .value(v)
                    .build()
                    .ok()
            })
            .collect();
        let output = self
            .sts
            .assume_role()
            .role_arn(&self.role_arn)
            .role_session_name(&self.session_name)
            .set_external_id(self.external_id.clone())
            .set_tags(Some(tags))
            .send()
            .await
            .map_err(|e| AwsCallError::from_sdk("AssumeRole", e))?;
        let issued = output
            .credentials
            .ok_or_else(|| AwsCallError::empty_answer("AssumeRole", "credentials"))?;
        Ok(Credentials::new(
            issued.access_key_id,
            issued.secret_access_key,
            Some(issued.session_token),
            SystemTime::try_from(issued.expiration).ok(),
            "embed-url-operator-assume-role",
        ))
    }
}

impl std::fmt::Debug for AssumedRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AssumedRole")
            .field("role_arn", &self.role_arn)
            .field("session_name", &self.session_name)
            .finish_non_exhaustive()
    }
}

impl ProvideCredentials for AssumedRole {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::new(async move {
            self.credentials()
                .await
                .map_err(CredentialsError::provider_error)
        })
    }
}

/// `embedurl-<namespace>-<policy>`, trimmed to STS's 64 characters. Namespace and policy names
/// are DNS names, which only use characters STS accepts.
pub fn session_name(namespace: &str, policy: &str) -> String {
    let mut name = format!("embedurl-{namespace}-{policy}");
    name.truncate(MAX_SESSION_NAME);
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_five_minutes_ahead_or_at_half_life() {
        let now = SystemTime::now();
        let creds = |lifetime: u64| {
            Credentials::new(
                "a",
                "b",
                None,
                Some(now + Duration::from_secs(lifetime)),
                "t",
            )
        };
        let hour = CachedCredentials::new(creds(3600), now);
        assert_eq!(hour.renew_at, now + Duration::from_secs(3300));
        let short = CachedCredentials::new(creds(240), now);
        assert_eq!(short.renew_at, now + Duration::from_secs(120));
    }

    #[tokio::test]
    async fn assumed_identities_are_bounded_per_tenant_and_in_all() {
        let clients = AwsClients::new(
            SdkConfig::builder()
                .behavior_version(aws_config::BehaviorVersion::latest())
                .build(),
        );
        let role = RoleToAssume {
            role_arn: "arn:aws:iam::111122223333:role/tenant".into(),
            external_id: None,
        };
        let region = |i: usize| format!("xx-made-up-{i}");
        // Another tenant's identity, used first (so the least recently used of all).
        let other = clients.assumed(&role, "us-east-1", "other-team", "policy");
        // One tenant naming ever new regions drops only its own least recently used ones.
        for i in 0..MAX_REGIONS_PER_TENANT {
            clients.assumed(&role, &region(i), "team", "policy");
        }
        let first = clients.assumed(&role, &region(0), "team", "policy");
        clients.assumed(&role, &region(MAX_REGIONS_PER_TENANT), "team", "policy");
        assert_eq!(clients.assumed_count(), MAX_REGIONS_PER_TENANT + 1);
        let again = clients.assumed(&role, &region(0), "team", "policy");
        assert!(Arc::ptr_eq(
            first.assumed.as_ref().unwrap(),
            again.assumed.as_ref().unwrap()
        ));
        let other_again = clients.assumed(&role, "us-east-1", "other-team", "policy");
        assert!(Arc::ptr_eq(
            other.assumed.as_ref().unwrap(),
            other_again.assumed.as_ref().unwrap()
        ));
        // Many tenants together stay within the overall bound.
        for i in 0..MAX_ASSUMED_IDENTITIES {
            let namespace = format!("team-{}", i / MAX_REGIONS_PER_TENANT);
            clients.assumed(&role, &region(i), &namespace, "policy");
        }
        assert_eq!(clients.assumed_count(), MAX_ASSUMED_IDENTITIES);
    }

    #[test]
    fn session_names_fit_sts() {
        assert_eq!(session_name("analytics", "team"), "embedurl-analytics-team");
        let long = session_name(&"n".repeat(63), &"p".repeat(63));
        assert_eq!(long.len(), 64);
        assert!(long.starts_with("embedurl-nnn"));
    }
}
