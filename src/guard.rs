//! A watched object that may not deserialize: kube's `DeserializeGuard`, without its copy.
//!
//! Requests written around the CRD schema (an older CRD, a hand-made object) must not stop the
//! watch: such an object is kept as its metadata and the error, and the reconciler reports it
//! (see `reconciler::reconcile`). kube-core's `DeserializeGuard` does that by buffering each
//! object as a generic value and then deserializing a full *clone* of it, so that the original
//! is still there for the metadata if the typed parse fails. The request watch sees every
//! request's status write, so at 10,000 requests that copy was made about 70 times a second
//! (and 10,000 times in a row on every relist). [`Guarded`] buffers once and deserializes the
//! typed object from a borrow of the buffer.
//!
//! The buffer is a generic value, not the raw JSON text: in a watch event whose object comes
//! before its type, serde hands the object over already buffered, and a raw-JSON capture fails
//! there. The API server writes the type first, but a guard that only works with one key order
//! would turn an unusual server into a broken watch.

use kube::api::ObjectMeta;
use kube::core::error_boundary::InvalidObject;
use kube::core::{PartialObjectMeta, Resource};
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};

/// `Ok` with the object, or `Err` with its metadata and why it does not deserialize.
#[derive(Debug, Clone)]
pub struct Guarded<K>(pub Result<K, InvalidObject>);

impl<'de, K> Deserialize<'de> for Guarded<K>
where
    K: DeserializeOwned + Resource,
{
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Without managedFields: the operator never reads them (see `crate::lean`).
        let buffer =
            serde_json::Value::deserialize(crate::lean::without_managed_fields(deserializer))?;
        match K::deserialize(&buffer) {
            Ok(object) => Ok(Guarded(Ok(object))),
            Err(error) => {
                // Without metadata the object cannot be cached or reported at all: that one
                // error is the watch's.
                let PartialObjectMeta { metadata, .. } =
                    PartialObjectMeta::<K>::deserialize(&buffer).map_err(D::Error::custom)?;
                Ok(Guarded(Err(InvalidObject {
                    error: error.to_string(),
                    metadata,
                })))
            }
        }
    }
}

impl<K: Resource> Resource for Guarded<K> {
    same_resource_as!(K);

    fn meta(&self) -> &ObjectMeta {
        self.0
            .as_ref()
            .map_or_else(|invalid| &invalid.metadata, K::meta)
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        self.0
            .as_mut()
            .map_or_else(|invalid| &mut invalid.metadata, K::meta_mut)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::EmbedUrlRequest;
    use kube::core::{ObjectList, WatchEvent};

    const VALID: &str = r#"{"apiVersion":"embedurl.io/v1alpha1","kind":"EmbedUrlRequest",
        "metadata":{"name":"sales","namespace":"analytics","uid":"u1","resourceVersion":"7"},
        "spec":{"secretName":"sales-url","quickSight":{"awsAccountId":"111122223333"}}}"#;
    const WRONG_TYPE: &str = r#"{"apiVersion":"embedurl.io/v1alpha1","kind":"EmbedUrlRequest",
        "metadata":{"name":"broken","namespace":"analytics","uid":"u2","resourceVersion":"8"},
        "spec":{"secretName":"s","quickSight":{"awsAccountId":"111122223333",
        "sessionLifetimeInMinutes":"ten"}}}"#;

    fn parse(json: &str) -> Guarded<EmbedUrlRequest> {
        serde_json::from_str(json).expect("metadata deserializes")
    }

    #[test]
    fn a_valid_object_is_kept_whole() {
        let request = parse(VALID).0.expect("valid");
        assert_eq!(request.meta().name.as_deref(), Some("sales"));
        assert_eq!(request.spec.secret_name.as_deref(), Some("sales-url"));
    }

    #[test]
    fn an_object_of_the_wrong_shape_keeps_its_metadata_and_the_error() {
        let guarded = parse(WRONG_TYPE);
        assert_eq!(guarded.meta().name.as_deref(), Some("broken"));
        assert_eq!(guarded.meta().resource_version.as_deref(), Some("8"));
        let invalid = guarded.0.expect_err("invalid");
        assert!(
            invalid.error.contains(r#"invalid type: string "ten""#),
            "{}",
            invalid.error
        );
    }

    #[test]
    fn managed_fields_are_not_kept() {
        let with_managed_fields = VALID.replace(
            r#""resourceVersion":"7""#,
            r#""resourceVersion":"7","managedFields":[{"manager":"kubectl","operation":"Apply",
            "fieldsType":"FieldsV1","fieldsV1":{"f:spec":{"f:secretName":{}}}}]"#,
        );
        let plain: EmbedUrlRequest = serde_json::from_str(&with_managed_fields).expect("parses");
        assert!(plain.meta().managed_fields.is_some(), "the input has them");
        let request = parse(&with_managed_fields).0.expect("valid");
        assert_eq!(request.meta().resource_version.as_deref(), Some("7"));
        assert_eq!(request.meta().managed_fields, None);
    }

    #[test]
    fn an_object_without_readable_metadata_is_an_error() {
        assert!(serde_json::from_str::<Guarded<EmbedUrlRequest>>(r#"{"metadata":7}"#).is_err());
    }

    /// kube hands the guard a serde_json deserializer in a watch event whose type comes first
    /// (as the API server writes it) and in a list, and an already buffered value in an event
    /// whose object comes first: all work.
    #[test]
    fn works_in_watch_events_and_lists_as_kube_parses_them() {
        for line in [
            format!(r#"{{"type":"MODIFIED","object":{WRONG_TYPE}}}"#),
            format!(r#"{{"object":{WRONG_TYPE},"type":"MODIFIED"}}"#),
        ] {
            let event: WatchEvent<Guarded<EmbedUrlRequest>> =
                serde_json::from_str(&line).expect("event");
            let WatchEvent::Modified(guarded) = event else {
                panic!("not MODIFIED")
            };
            assert!(guarded.0.is_err());
        }
        let list = format!(
            r#"{{"apiVersion":"embedurl.io/v1alpha1","kind":"EmbedUrlRequestList",
            "metadata":{{"resourceVersion":"9"}},"items":[{VALID},{WRONG_TYPE}]}}"#
        );
        let list: ObjectList<Guarded<EmbedUrlRequest>> = serde_json::from_str(&list).expect("list");
        let readable: Vec<bool> = list.items.iter().map(|item| item.0.is_ok()).collect();
        assert_eq!(readable, vec![true, false]);
    }
}
