//! Parsing Kubernetes objects without their `metadata.managedFields`.
//!
//! Every object the API server sends carries `managedFields`: who set which field, as a tree of
//! `FieldsV1` keys. The operator never reads it, yet every watch event and every write's answer
//! carried it through a full parse (a `Vec` of entries, each with a JSON tree, then dropped). The
//! request watch sees one event per refresh (the status write), the Secret watch another, and the
//! Secret write's answer is a third parse: at 10,000 requests that is about 200 parses a second,
//! and on a real cluster each object has an entry per manager that touched it.
//!
//! [`Filtered`] wraps a deserializer and skips `managedFields` inside `metadata` unparsed (as
//! `serde::de::IgnoredAny`, which allocates nothing), whatever type is deserialized from it:
//! everything else reaches that type as it came.
//! [`Lean`] is a watched or read object parsed through it.

use kube::api::ObjectMeta;
use kube::core::Resource;
use serde::de::value::{BorrowedStrDeserializer, StringDeserializer};
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Which map keys a [`Filtered`] deserializer drops, or looks into.
#[derive(Clone, Copy)]
enum Rule {
    /// Skip the value of this key.
    Drop(&'static str),
    /// Apply the rule to the value of this key.
    Within(&'static str, &'static Rule),
}

/// An object's `metadata.managedFields`.
const WITHOUT_MANAGED_FIELDS: Rule = Rule::Within("metadata", &Rule::Drop("managedFields"));

/// `deserializer`, with `metadata.managedFields` skipped unparsed.
pub fn without_managed_fields<'de, D: Deserializer<'de>>(deserializer: D) -> Filtered<D> {
    Filtered {
        inner: deserializer,
        rule: WITHOUT_MANAGED_FIELDS,
    }
}

/// A deserializer that hides the keys its rule names from whatever is deserialized from it.
pub struct Filtered<D> {
    inner: D,
    rule: Rule,
}

/// Only maps are filtered; every other hint is handed on as it came, so that the type being
/// deserialized sees its own errors and the format's own behaviour.
macro_rules! forward {
    ($($method:ident($($arg:ident: $ty:ty),*)),* $(,)?) => {
        $(
            fn $method<V: Visitor<'de>>(self, $($arg: $ty,)* visitor: V) -> Result<V::Value, D::Error> {
                self.inner.$method($($arg,)* FilteredVisitor { inner: visitor, rule: self.rule })
            }
        )*
    };
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Filtered<D> {
    type Error = D::Error;

    forward! {
        deserialize_any(), deserialize_bool(), deserialize_i8(), deserialize_i16(),
        deserialize_i32(), deserialize_i64(), deserialize_i128(), deserialize_u8(),
        deserialize_u16(), deserialize_u32(), deserialize_u64(), deserialize_u128(),
        deserialize_f32(), deserialize_f64(), deserialize_char(), deserialize_str(),
        deserialize_string(), deserialize_bytes(), deserialize_byte_buf(), deserialize_option(),
        deserialize_unit(), deserialize_unit_struct(name: &'static str),
        deserialize_newtype_struct(name: &'static str), deserialize_seq(),
        deserialize_tuple(len: usize), deserialize_tuple_struct(name: &'static str, len: usize),
        deserialize_map(), deserialize_struct(name: &'static str, fields: &'static [&'static str]),
        deserialize_enum(name: &'static str, variants: &'static [&'static str]),
        deserialize_identifier(), deserialize_ignored_any(),
    }

    fn is_human_readable(&self) -> bool {
        self.inner.is_human_readable()
    }
}

/// The visitor of the type being deserialized, handed maps that lack the filtered keys; every
/// other kind of value is handed on as it came (an option's or a newtype's content is filtered
/// like the value itself).
struct FilteredVisitor<V> {
    inner: V,
    rule: Rule,
}

impl<'de, V: Visitor<'de>> Visitor<'de> for FilteredVisitor<V> {
    type Value = V::Value;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        self.inner.expecting(formatter)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        self.inner.visit_map(FilteredMap {
            inner: map,
            rule: self.rule,
            filter_next_value: None,
        })
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        self.inner.visit_bool(v)
    }
    fn visit_i8<E: de::Error>(self, v: i8) -> Result<Self::Value, E> {
        self.inner.visit_i8(v)
    }
    fn visit_i16<E: de::Error>(self, v: i16) -> Result<Self::Value, E> {
        self.inner.visit_i16(v)
    }
    fn visit_i32<E: de::Error>(self, v: i32) -> Result<Self::Value, E> {
        self.inner.visit_i32(v)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        self.inner.visit_i64(v)
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Self::Value, E> {
        self.inner.visit_i128(v)
    }
    fn visit_u8<E: de::Error>(self, v: u8) -> Result<Self::Value, E> {
        self.inner.visit_u8(v)
    }
    fn visit_u16<E: de::Error>(self, v: u16) -> Result<Self::Value, E> {
        self.inner.visit_u16(v)
    }
    fn visit_u32<E: de::Error>(self, v: u32) -> Result<Self::Value, E> {
        self.inner.visit_u32(v)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        self.inner.visit_u64(v)
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Self::Value, E> {
        self.inner.visit_u128(v)
    }
    fn visit_f32<E: de::Error>(self, v: f32) -> Result<Self::Value, E> {
        self.inner.visit_f32(v)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        self.inner.visit_f64(v)
    }
    fn visit_char<E: de::Error>(self, v: char) -> Result<Self::Value, E> {
        self.inner.visit_char(v)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        self.inner.visit_str(v)
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        self.inner.visit_borrowed_str(v)
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        self.inner.visit_string(v)
    }
    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
        self.inner.visit_bytes(v)
    }
    fn visit_borrowed_bytes<E: de::Error>(self, v: &'de [u8]) -> Result<Self::Value, E> {
        self.inner.visit_borrowed_bytes(v)
    }
    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Self::Value, E> {
        self.inner.visit_byte_buf(v)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.inner.visit_unit()
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        self.inner.visit_none()
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<Self::Value, A::Error> {
        // An enum's content is not an object's metadata: handed on unfiltered.
        self.inner.visit_enum(data)
    }
    fn visit_some<D2: Deserializer<'de>>(self, deserializer: D2) -> Result<Self::Value, D2::Error> {
        // An optional object: filter inside it too.
        self.inner.visit_some(Filtered {
            inner: deserializer,
            rule: self.rule,
        })
    }
    fn visit_newtype_struct<D2: Deserializer<'de>>(
        self,
        deserializer: D2,
    ) -> Result<Self::Value, D2::Error> {
        self.inner.visit_newtype_struct(Filtered {
            inner: deserializer,
            rule: self.rule,
        })
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        self.inner.visit_seq(seq)
    }
}

/// A map without the keys the rule drops; the value of the key it looks into is filtered.
struct FilteredMap<A> {
    inner: A,
    rule: Rule,
    /// The rule for the value about to be read, when its key is the one looked into.
    filter_next_value: Option<Rule>,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for FilteredMap<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        loop {
            let Some(key) = self.inner.next_key::<Key<'de>>()? else {
                return Ok(None);
            };
            self.filter_next_value = None;
            match self.rule {
                Rule::Drop(dropped) if key.as_str() == dropped => {
                    self.inner.next_value::<IgnoredAny>()?;
                    continue;
                }
                Rule::Within(within, rule) if key.as_str() == within => {
                    self.filter_next_value = Some(*rule);
                }
                _ => {}
            }
            return match key {
                Key::Borrowed(text) => seed.deserialize(BorrowedStrDeserializer::new(text)),
                Key::Owned(text) => seed.deserialize(StringDeserializer::new(text)),
            }
            .map(Some);
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        match self.filter_next_value.take() {
            Some(rule) => self
                .inner
                .next_value_seed(FilteredSeed { inner: seed, rule }),
            None => self.inner.next_value_seed(seed),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        // At most one entry fewer; as a hint for preallocation, the inner one will do.
        self.inner.size_hint()
    }
}

/// A key as the format gives it: borrowed from the input when it can be (no escapes), so that
/// looking at it allocates nothing.
enum Key<'de> {
    Borrowed(&'de str),
    Owned(String),
}

impl Key<'_> {
    fn as_str(&self) -> &str {
        match self {
            Key::Borrowed(text) => text,
            Key::Owned(text) => text,
        }
    }
}

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str("a map key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key::Borrowed(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key::Owned(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key::Owned(v))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// `inner`, deserialized through a [`Filtered`] deserializer.
struct FilteredSeed<S> {
    inner: S,
    rule: Rule,
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for FilteredSeed<S> {
    type Value = S::Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<S::Value, D::Error> {
        self.inner.deserialize(Filtered {
            inner: deserializer,
            rule: self.rule,
        })
    }
}

/// An object of kind `K` parsed without its `metadata.managedFields`. Watching or reading
/// `Lean<PartialObjectMeta<Secret>>` asks the API server for the same as
/// `PartialObjectMeta<Secret>` does (the resource is `K`'s).
#[derive(Clone, Debug, Serialize)]
#[serde(transparent)]
pub struct Lean<K>(pub K);

impl<'de, K: Deserialize<'de>> Deserialize<'de> for Lean<K> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        K::deserialize(without_managed_fields(deserializer)).map(Lean)
    }
}

impl<K: Resource> Resource for Lean<K> {
    same_resource_as!(K);

    fn meta(&self) -> &ObjectMeta {
        self.0.meta()
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        self.0.meta_mut()
    }
}

/// A watch event of a [`Lean`] object, as one of the object itself.
pub fn unwrap_event<K>(
    event: kube::runtime::watcher::Event<Lean<K>>,
) -> kube::runtime::watcher::Event<K> {
    use kube::runtime::watcher::Event;
    match event {
        Event::Apply(Lean(object)) => Event::Apply(object),
        Event::Delete(Lean(object)) => Event::Delete(object),
        Event::Init => Event::Init,
        Event::InitApply(Lean(object)) => Event::InitApply(object),
        Event::InitDone => Event::InitDone,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Secret;
    use kube::core::{ObjectList, PartialObjectMeta, WatchEvent};
    use serde_json::{Value, json};

    const MANAGED_FIELDS: &str = r#"[{"manager":"embed-url-operator","operation":"Apply",
        "apiVersion":"v1","time":"2026-11-23T10:00:00Z","fieldsType":"FieldsV1",
        "fieldsV1":{"f:data":{"f:url":{}},"f:metadata":{"f:labels":{"f:app":{}}}}}]"#;

    fn secret_metadata_json(key_order_metadata_first: bool) -> String {
        let metadata = format!(
            r#""metadata":{{"name":"sales-url","namespace":"analytics","resourceVersion":"42",
            "managedFields":{MANAGED_FIELDS},"labels":{{"app":"sales"}},
            "ownerReferences":[{{"apiVersion":"embedurl.io/v1alpha1","kind":"EmbedUrlRequest",
            "name":"sales","uid":"u1","controller":true}}]}}"#
        );
        let types = r#""apiVersion":"meta.k8s.io/v1","kind":"PartialObjectMetadata""#;
        if key_order_metadata_first {
            format!("{{{metadata},{types}}}")
        } else {
            format!("{{{types},{metadata}}}")
        }
    }

    #[test]
    fn metadata_is_parsed_whole_but_for_managed_fields() {
        for order in [true, false] {
            let json = secret_metadata_json(order);
            let Lean(meta): Lean<PartialObjectMeta<Secret>> =
                serde_json::from_str(&json).expect("parses");
            let plain: PartialObjectMeta<Secret> = serde_json::from_str(&json).expect("parses");
            assert!(
                plain.metadata.managed_fields.is_some(),
                "the input has them"
            );
            assert_eq!(meta.metadata.managed_fields, None);
            let mut expected = plain.metadata.clone();
            expected.managed_fields = None;
            assert_eq!(meta.metadata, expected);
            assert_eq!(meta.types, plain.types);
        }
    }

    #[test]
    fn only_managed_fields_inside_metadata_are_skipped() {
        // Elsewhere a key of that name is data like any other.
        let json = json!({
            "metadata": {"name": "a", "managedFields": [], "labels": {"managedFields": "kept"}},
            "managedFields": "kept",
            "spec": {"metadata": {"managedFields": "kept"}},
        });
        let Lean(value): Lean<Value> = serde_json::from_str(&json.to_string()).expect("parses");
        let mut expected = json.clone();
        expected["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("managedFields");
        assert_eq!(value, expected);
    }

    #[test]
    fn escaped_keys_and_wrong_types_behave_as_without_the_filter() {
        // An escaped key cannot be borrowed from the input; it still names the field.
        let escaped = r#"{"metadata":{"name":"a","managed\u0046ields":[{"manager":"x"}]}}"#;
        let Lean(meta): Lean<PartialObjectMeta<Secret>> =
            serde_json::from_str(escaped).expect("parses");
        assert_eq!(meta.metadata.name.as_deref(), Some("a"));
        assert_eq!(meta.metadata.managed_fields, None);
        // A metadata that is not an object is refused in ObjectMeta's own words.
        let wrong = r#"{"metadata":7}"#;
        let filtered = serde_json::from_str::<Lean<PartialObjectMeta<Secret>>>(wrong)
            .expect_err("refused")
            .to_string();
        let plain = serde_json::from_str::<PartialObjectMeta<Secret>>(wrong)
            .expect_err("refused")
            .to_string();
        assert_eq!(filtered, plain);
    }

    /// As kube parses them: watch events (type first, as the API server writes them, or object
    /// first, which serde buffers before the filter sees it) and lists.
    #[test]
    fn works_in_watch_events_and_lists() {
        for json in [secret_metadata_json(false), secret_metadata_json(true)] {
            for line in [
                format!(r#"{{"type":"MODIFIED","object":{json}}}"#),
                format!(r#"{{"object":{json},"type":"MODIFIED"}}"#),
            ] {
                let event: WatchEvent<Lean<PartialObjectMeta<Secret>>> =
                    serde_json::from_str(&line).expect("event");
                let WatchEvent::Modified(Lean(meta)) = event else {
                    panic!("not MODIFIED")
                };
                assert_eq!(meta.metadata.resource_version.as_deref(), Some("42"));
                assert_eq!(meta.metadata.managed_fields, None);
            }
            let list = format!(
                r#"{{"apiVersion":"meta.k8s.io/v1","kind":"PartialObjectMetadataList",
                "metadata":{{"resourceVersion":"43"}},"items":[{json}]}}"#
            );
            let list: ObjectList<Lean<PartialObjectMeta<Secret>>> =
                serde_json::from_str(&list).expect("list");
            assert_eq!(list.items[0].0.metadata.managed_fields, None);
            assert_eq!(list.items[0].0.metadata.name.as_deref(), Some("sales-url"));
        }
    }

    #[test]
    fn asks_for_what_the_wrapped_kind_asks_for() {
        assert!(Lean::<PartialObjectMeta<Secret>>::metadata_api());
        assert!(!Lean::<Secret>::metadata_api());
        assert_eq!(Lean::<PartialObjectMeta<Secret>>::plural(&()), "secrets");
        assert_eq!(
            Lean::<PartialObjectMeta<Secret>>::url_path(&(), Some("analytics")),
            Secret::url_path(&(), Some("analytics"))
        );
    }

    /// Values other than maps reach the wrapped type as they came.
    #[test]
    fn other_values_pass_through() {
        let Lean(numbers): Lean<(u8, i16, f32, char, Option<String>)> =
            serde_json::from_str(r#"[7, -3, 1.5, "c", null]"#).expect("parses");
        assert_eq!(numbers, (7, -3, 1.5, 'c', None));
        let Lean(big): Lean<u128> = serde_json::from_str("340282366920938463463").expect("u128");
        assert_eq!(big, 340_282_366_920_938_463_463);
        #[derive(Deserialize, Debug, PartialEq)]
        enum Phase {
            Active,
            Terminating { since: String },
        }
        let Lean(phase): Lean<Phase> = serde_json::from_str(r#""Active""#).expect("unit variant");
        assert_eq!(phase, Phase::Active);
        let Lean(phase): Lean<Phase> =
            serde_json::from_str(r#"{"Terminating":{"since":"now"}}"#).expect("struct variant");
        assert_eq!(
            phase,
            Phase::Terminating {
                since: "now".into()
            }
        );
    }
}
