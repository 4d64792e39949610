//! Reads and writes the requests' Secrets through the API server: server-side apply under the
//! operator's field manager, reading back only metadata, and keeping the Secret cache told of
//! every read and write (see [`crate::secret_cache`]). What goes into a Secret is
//! [`crate::secret`]'s; when to write it is the reconciler's.

use crate::crd::EmbedUrlRequest;
use crate::error::{Error, Result};
use crate::lean::Lean;
use crate::providers::EmbedUrl;
use crate::reconciler::Context;
use crate::schedule;
use crate::secret::{self, FIELD_MANAGER, SecretContent, SecretSnapshot, StoredSecret, StoredUrl};
use crate::validation::ValidSpec;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::{Resource, ResourceExt};

/// Reads a Secret from the API server, records it in the cache, and says what it holds.
pub async fn read_secret(
    ctx: &Context,
    namespace: &str,
    name: &str,
    owner: secret::Owner<'_>,
    spec: &ValidSpec,
) -> Result<StoredSecret> {
    // A Secret the watch has not shown as this request's may be anyone's: its metadata says
    // whose, and only the operator's own Secrets are ever read whole (a Secret of that name
    // that someone else owns is checked again every minute while the conflict lasts).
    if !ctx.secrets.controlled_by(namespace, name, owner.uid) {
        let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
        let Some(meta) = api
            .get_metadata_opt(name)
            .await
            .map_err(Error::kube("reading the Secret's metadata"))?
        else {
            return Ok(StoredSecret::Missing);
        };
        let snapshot = SecretSnapshot::of_metadata(&meta.metadata, None);
        if let foreign @ StoredSecret::Foreign { .. } =
            secret::inspect(Some(&snapshot), owner, &spec.secret_template)
        {
            return Ok(foreign);
        }
    }
    let secret = fetch_secret(ctx, namespace, name).await?;
    let snapshot = secret.as_ref().map(SecretSnapshot::of);
    Ok(secret::inspect(
        snapshot.as_ref(),
        owner,
        &spec.secret_template,
    ))
}

async fn fetch_secret(ctx: &Context, namespace: &str, name: &str) -> Result<Option<Secret>> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let secret = api
        .get_opt(name)
        .await
        .map_err(Error::kube("reading the Secret"))?;
    if let Some(secret) = &secret {
        ctx.secrets.record(secret);
    }
    Ok(secret)
}

/// Re-applies the request's own Secret with the URL it holds, to restore labels and annotations
/// edited by hand. Reads the Secret first: the cache never holds the URL.
pub async fn restore_metadata(
    ctx: &Context,
    request: &EmbedUrlRequest,
    spec: &ValidSpec,
    owner: secret::Owner<'_>,
) -> Result<Option<SecretWritten>> {
    let Some(secret) = fetch_secret(
        ctx,
        &request.namespace().unwrap_or_default(),
        &spec.secret_name,
    )
    .await?
    else {
        return Ok(None);
    };
    let stored = secret::inspect(
        Some(&SecretSnapshot::of(&secret)),
        owner,
        &spec.secret_template,
    );
    // Only if it still holds this request's URL and still needs it (it may have changed since).
    if let StoredSecret::Owned { url: Some(url) } = stored
        && !url.metadata_intact
        && let Some(url_text) = secret::stored_url(&secret)
    {
        return apply_secret(ctx, request, spec, &url_text, &url)
            .await
            .map(Some);
    }
    Ok(None)
}

async fn apply_secret(
    ctx: &Context,
    request: &EmbedUrlRequest,
    spec: &ValidSpec,
    url: &EmbedUrl,
    stored: &StoredUrl,
) -> Result<SecretWritten> {
    // A `sessionExpiresAt` removed by hand is rebuilt: the URL was minted one use-by window
    // before its use-by time, and the session lasts the spec's length from then.
    let session_expires = stored.session_expires_at.unwrap_or_else(|| {
        let window = ctx.settings.windows.for_service(spec.service());
        let minted_at = schedule::sub(stored.expires_at, window);
        schedule::add(minted_at, spec.target.session_length())
    });
    let content = SecretContent {
        name: &spec.secret_name,
        url,
        url_expires_at: stored.expires_at,
        session_expires_at: session_expires,
        generation: stored.generation,
        template: &spec.secret_template,
    };
    server_side_apply_secret(ctx, request, &content).await
}

pub async fn apply_secret_content(
    ctx: &Context,
    request: &EmbedUrlRequest,
    spec: &ValidSpec,
    url: &EmbedUrl,
    url_expires_at: Timestamp,
    session_expires_at: Timestamp,
) -> Result<SecretWritten> {
    let content = SecretContent {
        name: &spec.secret_name,
        url,
        url_expires_at,
        session_expires_at,
        generation: request.meta().generation,
        template: &spec.secret_template,
    };
    server_side_apply_secret(ctx, request, &content).await
}

pub async fn server_side_apply_secret(
    ctx: &Context,
    request: &EmbedUrlRequest,
    content: &SecretContent<'_>,
) -> Result<SecretWritten> {
    let namespace = request.namespace().unwrap_or_default();
    let mut secret = secret::render(request, content);
    secret.metadata.managed_fields = None;
    // What is written becomes known: the watch's echo of this write, whether it arrives before
    // or after the response, triggers no reconcile.
    ctx.secrets.begin_write(&namespace, content.name);
    // Only the metadata of the answer is read, without its managedFields: the data is what was
    // just sent (the operator owns those keys), and parsing the whole Secret on every refresh
    // costs CPU for nothing.
    let written = apply_reading_metadata(
        ctx,
        &namespace,
        content.name,
        // k8s-openapi writes apiVersion and kind, which server-side apply needs.
        &Patch::Apply(&secret),
    )
    .await
    .map(|answer| Secret {
        metadata: answer.metadata,
        ..secret
    });
    let changed_meanwhile =
        ctx.secrets
            .finish_write(&namespace, content.name, written.as_ref().ok());
    written
        .map_err(|error| redact_url(error, content.url))
        .map_err(Error::kube("writing the Secret"))?;
    Ok(SecretWritten { changed_meanwhile })
}

/// Applies `patch` to Secret `name` as the operator's field manager (forcing its fields) and
/// reads the metadata of the answer (`as=PartialObjectMetadata`), managedFields left unparsed.
async fn apply_reading_metadata(
    ctx: &Context,
    namespace: &str,
    name: &str,
    patch: &Patch<&Secret>,
) -> Result<PartialObjectMeta<Secret>, kube::Error> {
    let mut request = kube::core::Request::new(Secret::url_path(&(), Some(namespace)))
        .patch_metadata(name, &PatchParams::apply(FIELD_MANAGER).force(), patch)
        .map_err(kube::Error::BuildRequest)?;
    // The name kube's tracing gives the call, as `Api::patch_metadata` would.
    request.extensions_mut().insert("patch_metadata");
    let Lean(answer) = ctx
        .client
        .request::<Lean<PartialObjectMeta<Secret>>>(request)
        .await?;
    Ok(answer)
}

/// `error` with `url` taken out of the API server's message: an admission webhook that refuses
/// the Secret may quote it, and every error ends up in a log line or the status.
pub fn redact_url(error: kube::Error, url: &EmbedUrl) -> kube::Error {
    match error {
        kube::Error::Api(mut status) => {
            // Everything that can carry text from the refused object: the message and each
            // cause (kube's Display of the error prints them all).
            status.message = url.redact_in(&status.message);
            status.reason = url.redact_in(&status.reason);
            if let Some(details) = status.details.as_mut() {
                for text in [&mut details.name, &mut details.group, &mut details.kind] {
                    *text = url.redact_in(text);
                }
                for cause in &mut details.causes {
                    cause.message = url.redact_in(&cause.message);
                    cause.field = url.redact_in(&cause.field);
                    cause.reason = url.redact_in(&cause.reason);
                }
            }
            kube::Error::Api(status)
        }
        other => other,
    }
}

/// The outcome of a Secret write.
#[must_use]
pub struct SecretWritten {
    /// Someone else changed the Secret while it was being written: look at it again soon.
    pub changed_meanwhile: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_refusal_quoting_the_secret_loses_the_url_everywhere_it_is_shown() {
        let url = EmbedUrl::new("https://x.example/embed?code=abc".to_string());
        // base64 of the URL, as the refused Secret's data carries it.
        let in_data = "aHR0cHM6Ly94LmV4YW1wbGUvZW1iZWQ/Y29kZT1hYmM=";
        let status: kube::core::Status = serde_json::from_value(json!({
            "code": 403,
            "reason": "denied https://x.example/embed?code=abc",
            "message": format!("denied: url is https://x.example/embed?code=abc"),
            "details": {"causes": [
                {"reason": "FieldValueForbidden", "message": format!("data.url={in_data}"), "field": "data.url"}
            ]}
        }))
        .unwrap();
        let redacted = redact_url(kube::Error::Api(Box::new(status)), &url);
        let shown = format!("{redacted} {redacted:?}");
        assert!(!shown.contains("code=abc"), "{shown}");
        assert!(!shown.contains(in_data), "{shown}");
        assert!(shown.contains("[URL]"), "{shown}");
    }
}
