//! Writes the requests' status subresource (server-side apply under the operator's field
//! manager, reading back only metadata), keeps the per-request metrics in step with what it
//! wrote, and publishes an Event when `Ready` changes. What the status says is
//! [`crate::status`]'s; when to write it is the reconciler's.

use crate::crd::{EmbedUrlRequest, EmbedUrlRequestStatus};
use crate::error::{Error, Result};
use crate::events::{self, EventType, Transition};
use crate::providers::Service;
use crate::reconciler::Context;
use crate::schedule;
use crate::secret::FIELD_MANAGER;
use crate::status::{self, reasons};
use crate::telemetry::Ready;
use crate::work_queue::RequestKey;
use kube::api::{Patch, PatchParams};
use kube::{Resource, ResourceExt};
use std::borrow::Cow;
use tracing::warn;

/// Replaces the stored status (`stored`, which does not parse) with `status`, wholesale: a
/// JSON merge patch that sets every field of `status` and removes every other stored one (a
/// stored status that is not even an object is replaced by the patch's object).
pub async fn replace_status(
    ctx: &Context,
    namespace: &str,
    name: &str,
    stored: Option<&serde_json::Value>,
    status: &EmbedUrlRequestStatus,
) -> Result<()> {
    let mut fields = match serde_json::to_value(status).map_err(|source| Error::Serialize {
        what: "status",
        source,
    })? {
        serde_json::Value::Object(fields) => fields,
        _ => serde_json::Map::new(),
    };
    if let Some(serde_json::Value::Object(stored)) = stored {
        for key in stored.keys() {
            fields.entry(key.clone()).or_insert(serde_json::Value::Null);
        }
    }
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..PatchParams::default()
    };
    let patch = Patch::Merge(serde_json::json!({ "status": fields }));
    patch_status(ctx, namespace, name, &params, &patch)
        .await
        .map_err(Error::kube("replacing an unreadable status"))?;
    Ok(())
}

/// Writes `desired` if it differs from `current`, and publishes an event if `Ready` changed.
pub async fn write_status(
    request: &EmbedUrlRequest,
    current: &EmbedUrlRequestStatus,
    desired: EmbedUrlRequestStatus,
    ctx: &Context,
) -> Result<()> {
    if &desired == current {
        publish_schedule(ctx, request, &desired);
        return Ok(());
    }
    if let Err(error) = apply_status(ctx, request, current, &desired).await {
        if error.is_not_found() {
            // Deleted meanwhile: its series went with the deletion and must not come back.
            let key = RequestKey::of(request);
            ctx.metrics.forget_request(&key.namespace, &key.name);
        }
        return Err(error);
    }
    publish_schedule(ctx, request, &desired);
    publish_transition(ctx, request, current, &desired).await;
    Ok(())
}

/// The per-request metrics (use-by time, next refresh, ready) say what `status` says. They are
/// set from every status a reconcile ends with, written or already in place, so that a restarted
/// operator exports them for requests it has no reason to refresh yet, and a request that is
/// halted (suspended, not permitted, in conflict, invalid) reports `ready` 0 and no next refresh.
/// A status without a service (the spec was never valid) has no series.
pub fn publish_schedule(ctx: &Context, request: &EmbedUrlRequest, status: &EmbedUrlRequestStatus) {
    let namespace = request.meta().namespace.as_deref().unwrap_or_default();
    let name = request.meta().name.as_deref().unwrap_or_default();
    let Some(service) = status.service.as_deref().and_then(Service::from_name) else {
        ctx.metrics.forget_request(namespace, name);
        return;
    };
    let condition = status.ready();
    let ready = Ready {
        is_true: condition.is_some_and(|c| c.status == "True"),
        reason: reasons::ReadyReason::of(condition.map_or("", |c| c.reason.as_str())),
    };
    ctx.metrics.set_schedule(
        namespace,
        name,
        service,
        schedule::parse_time(status.url_expires_at.as_deref()),
        schedule::parse_time(status.next_refresh_time.as_deref()),
        ready,
    );
}

async fn apply_status(
    ctx: &Context,
    request: &EmbedUrlRequest,
    current: &EmbedUrlRequestStatus,
    status: &EmbedUrlRequestStatus,
) -> Result<()> {
    let namespace = request.namespace().unwrap_or_default();
    apply_status_of(ctx, &namespace, &request.name_any(), current, status).await
}

/// The body of a status apply: serialized straight from the status, with no JSON value built
/// in between (once per refresh).
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusApply<'a> {
    api_version: Cow<'static, str>,
    kind: Cow<'static, str>,
    status: &'a EmbedUrlRequestStatus,
}

/// Writes the status of the request `namespace/name` (now `current`) with server-side apply.
///
/// A cluster whose EmbedUrlRequest CRD is older than the operator (Helm installs `crds/` but
/// never upgrades them) refuses an apply that sets a field the CRD does not declare, every
/// time: requests would never get a status. Then the status is applied again without the fields
/// the refusal names, and the operator says once what to do. Staying with server-side apply
/// keeps the operator's fields under its one apply manager: once the CRD is upgraded, a field
/// the operator stops sending is removed, as it would not be if a merge patch had written it.
/// Only a refusal naming no field that can be left out falls back to a merge patch.
pub async fn apply_status_of(
    ctx: &Context,
    namespace: &str,
    name: &str,
    current: &EmbedUrlRequestStatus,
    status: &EmbedUrlRequestStatus,
) -> Result<()> {
    let body = StatusApply {
        api_version: EmbedUrlRequest::api_version(&()),
        kind: EmbedUrlRequest::kind(&()),
        status,
    };
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let refusal = match patch_status(ctx, namespace, name, &params, &Patch::Apply(&body)).await {
        Err(kube::Error::Api(refusal)) if refusal.message.contains(FIELD_NOT_DECLARED) => refusal,
        result => return result.map_err(Error::kube("writing the status")),
    };
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        tracing::error!(
            error = %refusal.message,
            "the EmbedUrlRequest CRD in the cluster is older than this operator: status \
             fields it does not declare are left out until it is upgraded with \
             `kubectl apply --server-side --force-conflicts -f crds/` (from this operator's release)"
        );
    });
    let mut trimmed = serde_json::to_value(&body).map_err(|source| Error::Serialize {
        what: "status",
        source,
    })?;
    let mut message = refusal.message;
    // Each refusal names what it found; a few rounds cover any CRD version gap.
    for _ in 0..MAX_TRIMS {
        let undeclared = undeclared_fields(&message);
        let removed = undeclared
            .iter()
            .filter(|path| remove_field(&mut trimmed, path))
            .count();
        if removed == 0 {
            break;
        }
        match patch_status(ctx, namespace, name, &params, &Patch::Apply(&trimmed)).await {
            Err(kube::Error::Api(refusal)) if refusal.message.contains(FIELD_NOT_DECLARED) => {
                message = refusal.message;
            }
            result => return result.map_err(Error::kube("writing the status")),
        }
    }
    // A refusal that names nothing this can leave out (a field inside a list item, say).
    let stored = serde_json::to_value(current).map_err(|source| Error::Serialize {
        what: "status",
        source,
    })?;
    replace_status(ctx, namespace, name, Some(&stored), status).await
}

/// How many times an apply refused for undeclared fields is retried without them.
const MAX_TRIMS: usize = 4;

/// The fields an apply refusal says the CRD does not declare, as paths of object keys
/// (`.status.policy` is `["status", "policy"]`). Paths into list items are not returned.
fn undeclared_fields(message: &str) -> Vec<Vec<&str>> {
    message
        .match_indices(FIELD_NOT_DECLARED)
        .filter_map(|(at, _)| {
            // "...: .status.policy: field not declared in schema"
            let before = message[..at].trim_end().strip_suffix(':')?;
            let path = before.rsplit(char::is_whitespace).next()?;
            let keys: Vec<&str> = path.strip_prefix('.')?.split('.').collect();
            let plain = |key: &&str| {
                !key.is_empty()
                    && key
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            };
            keys.iter().all(plain).then_some(keys)
        })
        .collect()
}

/// Removes the field at `path` from `value`; whether it was there.
fn remove_field(value: &mut serde_json::Value, path: &[&str]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut at = value;
    for key in parents {
        match at.get_mut(*key) {
            Some(next) => at = next,
            None => return false,
        }
    }
    at.as_object_mut()
        .is_some_and(|object| object.remove(*last).is_some())
}

/// What the API server says of an applied field that the installed CRD's schema lacks.
const FIELD_NOT_DECLARED: &str = "field not declared in schema";

/// Patches a request's status. The operator needs nothing from the answer but whether it is a
/// success, so it asks for the metadata only (`as=PartialObjectMetadata`) and does not parse
/// it: parsing the object would cost CPU on every refresh, and the object of a request whose
/// spec does not deserialize could not be parsed at all. A refusal is still read (kube turns
/// an answer that is not a 2xx into `kube::Error::Api`).
async fn patch_status<P: serde::Serialize>(
    ctx: &Context,
    namespace: &str,
    name: &str,
    params: &PatchParams,
    patch: &Patch<P>,
) -> Result<(), kube::Error> {
    let mut request = kube::core::Request::new(EmbedUrlRequest::url_path(&(), Some(namespace)))
        .patch_subresource("status", name, params, patch)
        .map_err(kube::Error::BuildRequest)?;
    request.headers_mut().insert(
        http::header::ACCEPT,
        http::HeaderValue::from_static(METADATA_ONLY),
    );
    ctx.client.request_text(request).await?;
    Ok(())
}

/// The media type that asks the API server for an object's metadata only.
const METADATA_ONLY: &str = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1";

/// Events mark transitions of `Ready` (status or reason), never every refresh.
pub async fn publish_transition(
    ctx: &Context,
    request: &EmbedUrlRequest,
    current: &EmbedUrlRequestStatus,
    desired: &EmbedUrlRequestStatus,
) {
    let before = current
        .ready()
        .map(|c| (c.status.as_str(), c.reason.as_str()));
    let Some(after) = desired.ready() else {
        return;
    };
    if before == Some((after.status.as_str(), after.reason.as_str())) {
        return;
    }
    let transition = Transition {
        type_: if after.status == "True" && after.reason == reasons::URL_READY {
            EventType::Normal
        } else {
            EventType::Warning
        },
        reason: after.reason.to_string(),
        note: status::event_note(&after.message),
        action: "Reconcile",
    };
    let regarding = request.object_ref(&());
    if let Err(error) =
        events::publish(ctx.client.clone(), &ctx.reporter, transition, regarding).await
    {
        // An event is a courtesy; failing to publish one must not fail the reconcile.
        warn!(
            namespace = request.namespace().as_deref().unwrap_or_default(),
            name = request.name_any(),
            error = %error,
            "could not publish event"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn undeclared_fields_are_read_from_the_refusal() {
        let one = "failed to create typed patch object (analytics/console; \
                   embedurl.io/v1alpha1, Kind=EmbedUrlRequest): .status.policy: field not \
                   declared in schema";
        assert_eq!(undeclared_fields(one), [vec!["status", "policy"]]);
        let several = "failed to create typed patch object (analytics/console; \
                       embedurl.io/v1alpha1, Kind=EmbedUrlRequest): errors:\n  \
                       .status.policy: field not declared in schema\n  \
                       .status.lastHandledRefreshRequest: field not declared in schema";
        assert_eq!(
            undeclared_fields(several),
            [
                vec!["status", "policy"],
                vec!["status", "lastHandledRefreshRequest"]
            ]
        );
        // Inside a list item: not something this can leave out.
        let in_list =
            "errors: .status.conditions[type=\"Ready\"].extra: field not declared in schema";
        assert!(undeclared_fields(in_list).is_empty());
    }

    #[test]
    fn removing_a_field_says_whether_it_was_there() {
        let mut body = json!({"status": {"policy": "team", "secretName": "s"}});
        assert!(remove_field(&mut body, &["status", "policy"]));
        assert!(!remove_field(&mut body, &["status", "policy"]));
        assert!(!remove_field(&mut body, &["spec", "x"]));
        assert_eq!(body, json!({"status": {"secretName": "s"}}));
    }
}
