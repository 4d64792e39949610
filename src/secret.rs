//! The Secret that carries the URL: how it is rendered, and how a stored one is read back.
//!
//! The Secret is the durable record of the URL being served. Besides the three documented keys
//! it carries two annotations that let a restarted operator trust it without asking AWS again:
//! the spec generation the URL was minted for, and a SHA-256 digest of the URL (so an edit by
//! hand is noticed). Neither reveals the URL.

use crate::crd::{EmbedUrlRequest, SecretTemplate};
use crate::providers::EmbedUrl;
use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// The one field manager of every write the operator makes (server-side apply).
pub const FIELD_MANAGER: &str = "embed-url-operator";
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "embed-url-operator";
/// Label selector of the Secrets the operator owns: the only Secrets it watches and caches.
pub const MANAGED_SECRETS_SELECTOR: &str = "app.kubernetes.io/managed-by=embed-url-operator";

pub const URL_KEY: &str = "url";
pub const EXPIRES_AT_KEY: &str = "expiresAt";
pub const SESSION_EXPIRES_AT_KEY: &str = "sessionExpiresAt";
pub const GENERATION_ANNOTATION: &str = "embedurl.io/generation";
pub const URL_DIGEST_ANNOTATION: &str = "embedurl.io/url-sha256";

/// Everything that goes into the Secret for one minted URL.
pub struct SecretContent<'a> {
    pub name: &'a str,
    pub url: &'a EmbedUrl,
    pub url_expires_at: Timestamp,
    pub session_expires_at: Timestamp,
    pub generation: Option<i64>,
    pub template: &'a SecretTemplate,
}

/// Renders the full desired Secret for server-side apply: every field the operator owns.
pub fn render(owner: &EmbedUrlRequest, content: &SecretContent<'_>) -> Secret {
    let mut labels = content.template.labels.clone();
    labels.insert(MANAGED_BY_LABEL.to_string(), MANAGED_BY_VALUE.to_string());
    let mut annotations = content.template.annotations.clone();
    annotations.insert(
        URL_DIGEST_ANNOTATION.to_string(),
        digest(content.url.expose()),
    );
    if let Some(generation) = content.generation {
        annotations.insert(GENERATION_ANNOTATION.to_string(), generation.to_string());
    }
    let data = BTreeMap::from([
        (
            URL_KEY.to_string(),
            ByteString(content.url.expose().as_bytes().to_vec()),
        ),
        (
            EXPIRES_AT_KEY.to_string(),
            ByteString(rfc3339(content.url_expires_at).into_bytes()),
        ),
        (
            SESSION_EXPIRES_AT_KEY.to_string(),
            ByteString(rfc3339(content.session_expires_at).into_bytes()),
        ),
    ]);
    Secret {
        metadata: ObjectMeta {
            name: Some(content.name.to_string()),
            namespace: owner.meta().namespace.clone(),
            labels: Some(labels),
            annotations: Some(annotations),
            // Controller reference without blockOwnerDeletion: the garbage collector removes the
            // Secret with its request either way, and setting it would need `update` on
            // embedurlrequests/finalizers where OwnerReferencesPermissionEnforcement is on.
            owner_references: owner.controller_owner_ref(&()).map(|mut r| {
                r.block_owner_deletion = None;
                vec![r]
            }),
            ..Default::default()
        },
        type_: Some("Opaque".to_string()),
        data: Some(data),
        ..Default::default()
    }
}

/// What the stored Secret of a request holds, as far as the refresh schedule is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoredSecret {
    /// No Secret of that name exists.
    Missing,
    /// A Secret of that name exists but this request does not control it: never overwritten.
    Foreign { controller: Option<String> },
    /// The request's own Secret. `url` is `None` when it holds no usable URL record (emptied,
    /// edited by hand, or written by an older operator).
    Owned { url: Option<StoredUrl> },
}

/// The URL record an owned Secret holds. The URL itself is not copied out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredUrl {
    pub expires_at: Timestamp,
    pub session_expires_at: Option<Timestamp>,
    /// Spec generation the URL was minted for.
    pub generation: Option<i64>,
    /// Whether the labels and template metadata are as the operator would write them; when not,
    /// the Secret is re-applied (without a new mint) to restore them.
    pub metadata_intact: bool,
}

/// What the operator keeps of a Secret: the metadata it checks and a digest of the data, never
/// the URL itself. Small (a few hundred bytes), so that caching every owned Secret costs little,
/// and safe to keep around: nothing in it is a credential. The operator's own label and
/// annotations are kept parsed, not as strings: one snapshot per request adds up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretSnapshot {
    pub resource_version: Option<Box<str>>,
    /// `Kind/name` and uid of the controlling owner reference.
    controller: Option<(Box<str>, Box<str>)>,
    /// Whether that reference is an `EmbedUrlRequest`'s ([`is_request_controller`]).
    controlled_by_request: bool,
    /// Whether the Secret carries the label the operator's watch selects.
    labelled: bool,
    /// The `embedurl.io/url-sha256` annotation, if it is a digest as the operator writes it.
    annotated_digest: Option<[u8; 32]>,
    /// The `embedurl.io/generation` annotation, if it is a number.
    annotated_generation: Option<i64>,
    /// A fingerprint of every other label and annotation (key and value), sorted: enough to tell
    /// whether those a `secretTemplate` sets are there. Not the text: other tools' annotations
    /// can be large, and `kubectl.kubernetes.io/last-applied-configuration` can even hold the
    /// Secret's data, URL included.
    labels: Box<[u64]>,
    annotations: Box<[u64]>,
    /// What the data says, if known: a metadata-only watch event does not carry it.
    pub data: Option<DataFacts>,
}

/// The facts the operator needs from a Secret's data and type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataFacts {
    /// SHA-256 of `data.url`, if it holds a non-empty text.
    url_digest: Option<[u8; 32]>,
    expires_at: Option<Timestamp>,
    session_expires_at: Option<Timestamp>,
    opaque: bool,
}

/// Whether an owner reference is the controller reference of an `EmbedUrlRequest`, of any
/// version of the API: a new CRD version keeps the group and kind, and the references written
/// under the old one still name the same objects (as the garbage collector reads them).
pub fn is_request_controller(owner: &OwnerReference) -> bool {
    owner.controller == Some(true)
        && owner.kind == EmbedUrlRequest::kind(&())
        && owner
            .api_version
            .split_once('/')
            .map(|(group, _version)| group)
            == Some(&*EmbedUrlRequest::group(&()))
}

impl SecretSnapshot {
    /// The name of the `EmbedUrlRequest` whose controller reference the Secret carries.
    /// Whether the request with uid `uid` controls this Secret.
    pub fn controlled_by(&self, uid: &str) -> bool {
        self.controlled_by_request
            && self
                .controller
                .as_ref()
                .is_some_and(|(_, controller)| controller.as_ref() == uid)
    }

    pub fn controlling_request(&self) -> Option<&str> {
        let (kind_and_name, _uid) = self
            .controller
            .as_ref()
            .filter(|_| self.controlled_by_request)?;
        kind_and_name.split_once('/').map(|(_kind, name)| name)
    }

    /// The snapshot of a whole Secret, as read or written.
    pub fn of(secret: &Secret) -> Self {
        let data = secret.data.as_ref();
        let text = |key: &str| {
            data.and_then(|d| d.get(key))
                .and_then(|v| std::str::from_utf8(&v.0).ok())
        };
        let facts = DataFacts {
            url_digest: text(URL_KEY)
                .filter(|u| !u.is_empty())
                .map(|u| Sha256::digest(u.as_bytes()).into()),
            expires_at: text(EXPIRES_AT_KEY).and_then(|t| t.parse().ok()),
            session_expires_at: text(SESSION_EXPIRES_AT_KEY).and_then(|t| t.parse().ok()),
            opaque: secret.type_.as_deref() == Some("Opaque"),
        };
        Self::of_metadata(&secret.metadata, Some(facts))
    }

    /// The snapshot of a Secret's metadata; `data` as far as known.
    pub fn of_metadata(meta: &ObjectMeta, data: Option<DataFacts>) -> Self {
        let others = |map: &Option<BTreeMap<String, String>>, own: &[&str]| {
            let mut fingerprints: Vec<u64> = map
                .iter()
                .flatten()
                .filter(|(k, _)| !own.contains(&k.as_str()))
                .map(|(k, v)| fingerprint(k, v))
                .collect();
            fingerprints.sort_unstable();
            fingerprints.into_boxed_slice()
        };
        let annotation = |key: &str| meta.annotations.as_ref().and_then(|a| a.get(key));
        let controlling = meta
            .owner_references
            .iter()
            .flatten()
            .find(|r| r.controller == Some(true));
        let controller = controlling.map(|c| {
            (
                format!("{}/{}", c.kind, c.name).into_boxed_str(),
                c.uid.as_str().into(),
            )
        });
        SecretSnapshot {
            resource_version: meta.resource_version.as_deref().map(Box::from),
            controller,
            controlled_by_request: controlling.is_some_and(is_request_controller),
            labelled: meta.labels.as_ref().and_then(|l| l.get(MANAGED_BY_LABEL))
                == Some(&MANAGED_BY_VALUE.to_string()),
            annotated_digest: annotation(URL_DIGEST_ANNOTATION).and_then(|h| parse_hex(h)),
            annotated_generation: annotation(GENERATION_ANNOTATION).and_then(|g| g.parse().ok()),
            labels: others(&meta.labels, &[MANAGED_BY_LABEL]),
            annotations: others(
                &meta.annotations,
                &[URL_DIGEST_ANNOTATION, GENERATION_ANNOTATION],
            ),
            data,
        }
    }

    /// Whether the Secret carries label `key` with `value`.
    fn has_label(&self, key: &str, value: &str) -> bool {
        match key {
            MANAGED_BY_LABEL => self.labelled && value == MANAGED_BY_VALUE,
            _ => self.labels.binary_search(&fingerprint(key, value)).is_ok(),
        }
    }

    /// Whether the Secret carries annotation `key` with `value`.
    fn has_annotation(&self, key: &str, value: &str) -> bool {
        match key {
            URL_DIGEST_ANNOTATION => self.annotated_digest.is_some_and(|d| hex(&d) == value),
            GENERATION_ANNOTATION => self
                .annotated_generation
                .is_some_and(|g| g.to_string() == value),
            _ => self
                .annotations
                .binary_search(&fingerprint(key, value))
                .is_ok(),
        }
    }

    /// Whether the Secret carries the label the operator's watch selects.
    pub fn is_labelled(&self) -> bool {
        self.labelled
    }
}

/// A fingerprint of a label or annotation, key and value together (stable within the process,
/// which is all a cached snapshot needs).
fn fingerprint(key: &str, value: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    // `str`'s Hash ends each string with a separator, so ("ab", "c") and ("a", "bc") differ.
    key.hash(&mut hasher);
    value.hash(&mut hasher);
    hasher.finish()
}

/// The 32 bytes a digest annotation spells, in lowercase hex as [`hex`] writes it.
fn parse_hex(text: &str) -> Option<[u8; 32]> {
    let digits = text.as_bytes();
    if digits.len() != 64 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut bytes = [0u8; 32];
    for (byte, pair) in bytes.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(bytes)
}

/// The request a Secret is read back for.
#[derive(Clone, Copy, Debug)]
pub struct Owner<'a> {
    pub uid: &'a str,
    pub name: &'a str,
}

/// Reads a stored Secret back for the request `owner`. The snapshot must include its data
/// facts (see [`SecretSnapshot::data`]); without them it counts as holding no URL.
///
/// A Secret controlled by an earlier request of the same name (deleted, then created again:
/// `kubectl replace --force`, Argo CD's `Replace=true`) is this request's to take over, holding
/// no usable URL: two requests of one name cannot exist at once in a namespace, so that owner
/// is gone, and the garbage collector, which may take a while, would only delete the Secret.
/// Reported as a conflict, it would be one until the collector caught up.
pub fn inspect(
    secret: Option<&SecretSnapshot>,
    owner: Owner<'_>,
    template: &SecretTemplate,
) -> StoredSecret {
    let Some(secret) = secret else {
        return StoredSecret::Missing;
    };
    match &secret.controller {
        Some((_, uid)) if uid.as_ref() == owner.uid => StoredSecret::Owned {
            url: read_url_record(secret, template),
        },
        Some((controller, _))
            if secret.controlled_by_request
                && controller.split_once('/').map(|(_, name)| name) == Some(owner.name) =>
        {
            StoredSecret::Owned { url: None }
        }
        controller => StoredSecret::Foreign {
            controller: controller.as_ref().map(|(name, _)| name.to_string()),
        },
    }
}

fn read_url_record(secret: &SecretSnapshot, template: &SecretTemplate) -> Option<StoredUrl> {
    let data = secret.data.as_ref()?;
    let url_digest = data.url_digest?;
    let expires_at = data.expires_at?;
    // A URL that does not match the digest was edited by hand: it is not the one we minted and
    // we cannot vouch for its use-by time.
    if secret.annotated_digest != Some(url_digest) {
        return None;
    }
    let metadata_intact = secret.is_labelled()
        && template.labels.iter().all(|(k, v)| secret.has_label(k, v))
        && template
            .annotations
            .iter()
            .all(|(k, v)| secret.has_annotation(k, v))
        && data.opaque;
    Some(StoredUrl {
        expires_at,
        session_expires_at: data.session_expires_at,
        generation: secret.annotated_generation,
        metadata_intact,
    })
}

/// Reads the URL out of an owned Secret, to re-apply it unchanged when only metadata needs
/// restoring.
pub fn stored_url(secret: &Secret) -> Option<EmbedUrl> {
    let bytes = secret.data.as_ref()?.get(URL_KEY)?;
    let url = std::str::from_utf8(&bytes.0).ok()?;
    (!url.is_empty()).then(|| EmbedUrl::new(url.to_string()))
}

fn digest(url: &str) -> String {
    hex(&Sha256::digest(url.as_bytes()).into())
}

fn hex(bytes: &[u8; 32]) -> String {
    // Once per write and per watch echo: a `format!` per byte showed in profiles.
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(2 * bytes.len());
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    out
}

/// RFC 3339 in UTC with second precision, the format of every time the operator writes.
pub fn rfc3339(t: Timestamp) -> String {
    // Truncate, never round: a stored `expiresAt` must not claim time the URL does not have,
    // and every schedule derived from it (after a restart) must stay on the safe side.
    crate::schedule::floor_second(t)
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{EmbedUrlRequestSpec, QuickSightSpec};

    fn request() -> EmbedUrlRequest {
        let mut eur = EmbedUrlRequest::new(
            "sales",
            EmbedUrlRequestSpec {
                quick_sight: Some(Box::new(QuickSightSpec {
                    aws_account_id: "111122223333".into(),
                    ..Default::default()
                })),
                ..Default::default()
            },
        );
        eur.metadata.namespace = Some("analytics".into());
        eur.metadata.uid = Some("uid-1".into());
        eur
    }

    fn template() -> SecretTemplate {
        SecretTemplate {
            labels: [("team".to_string(), "bi".to_string())].into(),
            annotations: [("note".to_string(), "hello".to_string())].into(),
        }
    }

    fn rendered(url: &str) -> Secret {
        let url = EmbedUrl::new(url.into());
        let template = template();
        render(
            &request(),
            &SecretContent {
                name: "sales-url",
                url: &url,
                url_expires_at: "2026-11-22T10:05:00Z".parse().unwrap(),
                session_expires_at: "2026-11-22T20:00:00Z".parse().unwrap(),
                generation: Some(3),
                template: &template,
            },
        )
    }

    #[test]
    fn renders_keys_labels_and_controller_owner() {
        let secret = rendered("https://example.test/embed?code=abc");
        let data = secret.data.as_ref().unwrap();
        assert_eq!(data["url"].0, b"https://example.test/embed?code=abc");
        assert_eq!(data["expiresAt"].0, b"2026-11-22T10:05:00Z");
        assert_eq!(data["sessionExpiresAt"].0, b"2026-11-22T20:00:00Z");
        assert_eq!(secret.type_.as_deref(), Some("Opaque"));
        let labels = secret.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[MANAGED_BY_LABEL], MANAGED_BY_VALUE);
        assert_eq!(labels["team"], "bi");
        let annotations = secret.metadata.annotations.as_ref().unwrap();
        assert_eq!(annotations["note"], "hello");
        assert_eq!(annotations[GENERATION_ANNOTATION], "3");
        assert!(!annotations[URL_DIGEST_ANNOTATION].contains("example"));
        let owner = &secret.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(owner.uid, "uid-1");
        assert_eq!(owner.kind, "EmbedUrlRequest");
        assert_eq!(owner.controller, Some(true));
        // Setting it would need `update` on embedurlrequests/finalizers, which the chart's
        // RBAC does not grant (OwnerReferencesPermissionEnforcement, e.g. on OpenShift).
        assert_eq!(owner.block_owner_deletion, None);
        assert_eq!(secret.metadata.namespace.as_deref(), Some("analytics"));
    }

    /// The request `rendered` writes for, with uid `uid`.
    fn owner(uid: &str) -> Owner<'_> {
        Owner { uid, name: "sales" }
    }

    #[test]
    fn reads_back_what_it_wrote() {
        let secret = rendered("https://example.test/a");
        let StoredSecret::Owned { url: Some(stored) } = inspect(
            Some(&SecretSnapshot::of(&secret)),
            owner("uid-1"),
            &template(),
        ) else {
            panic!("expected an owned Secret with a URL");
        };
        assert_eq!(
            stored.expires_at,
            "2026-11-22T10:05:00Z".parse::<Timestamp>().unwrap()
        );
        assert_eq!(stored.generation, Some(3));
        assert!(stored.metadata_intact);
        assert_eq!(
            stored_url(&secret).unwrap().expose(),
            "https://example.test/a"
        );
    }

    #[test]
    fn notices_edits_and_foreign_secrets() {
        assert_eq!(
            inspect(None, owner("uid-1"), &template()),
            StoredSecret::Missing
        );

        let mut edited = rendered("https://example.test/a");
        edited
            .data
            .as_mut()
            .unwrap()
            .insert(URL_KEY.into(), ByteString(b"https://evil.test".to_vec()));
        assert_eq!(
            inspect(
                Some(&SecretSnapshot::of(&edited)),
                owner("uid-1"),
                &template()
            ),
            StoredSecret::Owned { url: None }
        );

        let mut relabelled = rendered("https://example.test/a");
        relabelled.metadata.labels = None;
        let StoredSecret::Owned { url: Some(stored) } = inspect(
            Some(&SecretSnapshot::of(&relabelled)),
            owner("uid-1"),
            &template(),
        ) else {
            panic!("a relabelled Secret still holds a good URL");
        };
        assert!(!stored.metadata_intact);

        let other_owner = rendered("https://example.test/a");
        let another_request = Owner {
            uid: "uid-2",
            name: "console",
        };
        assert!(matches!(
            inspect(Some(&SecretSnapshot::of(&other_owner)), another_request, &template()),
            StoredSecret::Foreign { controller: Some(c) } if c == "EmbedUrlRequest/sales"
        ));
        // The same name with another uid: an earlier request of that name, deleted; its
        // Secret is taken over, with no URL to trust.
        let successor = Owner {
            uid: "uid-2",
            name: "sales",
        };
        assert_eq!(
            inspect(
                Some(&SecretSnapshot::of(&other_owner)),
                successor,
                &template()
            ),
            StoredSecret::Owned { url: None }
        );
        // Not for a controller of another kind that happens to have the name.
        let mut not_a_request = rendered("https://example.test/a");
        not_a_request.metadata.owner_references.as_mut().unwrap()[0].kind = "Deployment".into();
        assert!(matches!(
            inspect(
                Some(&SecretSnapshot::of(&not_a_request)),
                successor,
                &template()
            ),
            StoredSecret::Foreign { .. }
        ));
        let unowned = Secret::default();
        assert_eq!(
            inspect(
                Some(&SecretSnapshot::of(&unowned)),
                owner("uid-1"),
                &template()
            ),
            StoredSecret::Foreign { controller: None }
        );
    }

    #[test]
    fn the_operators_own_metadata_is_kept_parsed() {
        let secret = rendered("https://example.test/a");
        let snapshot = SecretSnapshot::of(&secret);
        assert!(snapshot.is_labelled());
        assert_eq!(snapshot.annotated_generation, Some(3));
        assert_eq!(
            snapshot.annotated_digest.map(|d| hex(&d)),
            Some(digest("https://example.test/a"))
        );
        // What a template set is recognised, by key and value.
        assert!(snapshot.has_label("team", "bi"));
        assert!(!snapshot.has_label("team", "sales"));
        assert!(snapshot.has_annotation("note", "hello"));
        assert!(!snapshot.has_annotation("note", "hell"));
        assert!(!snapshot.has_annotation("not", "ehello"));
        // A template that names the operator's own keys is compared with what they hold.
        assert!(snapshot.has_annotation(GENERATION_ANNOTATION, "3"));
        assert!(!snapshot.has_annotation(GENERATION_ANNOTATION, "4"));
        assert!(snapshot.has_label(MANAGED_BY_LABEL, MANAGED_BY_VALUE));

        // A digest annotation edited by hand, even to the same digest in capitals, no longer
        // vouches for the URL.
        let mut edited = secret.clone();
        let annotations = edited.metadata.annotations.as_mut().unwrap();
        let upper = annotations[URL_DIGEST_ANNOTATION].to_uppercase();
        annotations.insert(URL_DIGEST_ANNOTATION.into(), upper);
        assert_eq!(
            inspect(
                Some(&SecretSnapshot::of(&edited)),
                owner("uid-1"),
                &template()
            ),
            StoredSecret::Owned { url: None }
        );
        assert_eq!(parse_hex("abc"), None);
        assert_eq!(parse_hex(&"g".repeat(64)), None);
    }

    #[test]
    fn debug_output_never_shows_the_url() {
        let url = EmbedUrl::new("https://secret.test/xyz".into());
        assert!(!format!("{url:?}").contains("secret.test"));
    }

    #[test]
    fn a_snapshot_keeps_no_text_of_other_tools_annotations() {
        // `kubectl apply` of a Secret manifest leaves its data, URL included, in an annotation.
        let mut secret = rendered("https://example.test/a");
        secret.metadata.annotations.as_mut().unwrap().insert(
            "kubectl.kubernetes.io/last-applied-configuration".into(),
            r#"{"data":{"url":"https://example.test/a"}}"#.into(),
        );
        let snapshot = SecretSnapshot::of(&secret);
        assert!(!format!("{snapshot:?}").contains("example.test"));
        // What a template set is still recognised.
        assert!(snapshot.has_annotation("note", "hello"));
    }

    #[test]
    fn written_times_are_truncated_so_they_never_claim_extra_time() {
        let t: Timestamp = "2026-11-22T08:00:09.999Z".parse().unwrap();
        assert_eq!(rfc3339(t), "2026-11-22T08:00:09Z");
        let whole: Timestamp = "2026-11-22T08:00:09Z".parse().unwrap();
        assert_eq!(rfc3339(whole), "2026-11-22T08:00:09Z");
    }
}
