//! Kubernetes Events (`events.k8s.io/v1`) that mark a request's transitions.
//!
//! kube's `Recorder` names an event `<object name>.<nanoseconds in hex>`, as client-go does.
//! An object name may be 253 characters long, and so may an event's: for a request named with
//! more than about 236 characters the API server refuses every event (422, name too long). The
//! events here are named the same way, with the object's name shortened to leave room.

use jiff::Timestamp;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use kube::{Api, Client};

/// The longest object name the API server accepts (a DNS subdomain).
const MAX_NAME_LEN: usize = 253;

/// Normal or Warning, as `kubectl get events` shows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Normal,
    Warning,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

/// Who publishes the events: `reportingController` and `reportingInstance`.
#[derive(Clone, Debug)]
pub struct Reporter {
    pub controller: String,
    /// The pod's name; the controller's name when unknown.
    pub instance: Option<String>,
}

/// What happened to the object.
pub struct Transition {
    pub type_: EventType,
    pub reason: String,
    pub note: String,
    pub action: &'static str,
}

/// `<object name>.<nanoseconds in hex>`, with the object's name cut short so the whole stays a
/// valid name: at most 253 characters, and no label ending in `-` or `.` before the suffix.
pub fn event_name(object_name: &str, now: Timestamp) -> String {
    let suffix = format!("{:x}", now.as_nanosecond());
    let room = MAX_NAME_LEN - 1 - suffix.len();
    // Object names are ASCII (a DNS subdomain), so cutting at a byte is cutting at a character;
    // for anything else fall back to the longest prefix that ends on a character boundary.
    let mut end = object_name.len().min(room);
    while !object_name.is_char_boundary(end) {
        end -= 1;
    }
    let prefix = object_name[..end].trim_end_matches(['-', '.']);
    format!("{prefix}.{suffix}")
}

/// Creates one event about `regarding`, in its namespace.
pub async fn publish(
    client: Client,
    reporter: &Reporter,
    transition: Transition,
    regarding: ObjectReference,
) -> Result<(), kube::Error> {
    let now = Timestamp::now();
    let namespace = regarding
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_string());
    let object_name = regarding.name.as_deref().unwrap_or(&reporter.controller);
    let event = Event {
        metadata: ObjectMeta {
            name: Some(event_name(object_name, now)),
            namespace: Some(namespace.clone()),
            ..ObjectMeta::default()
        },
        action: Some(transition.action.to_string()),
        reason: Some(transition.reason),
        note: Some(transition.note),
        type_: Some(transition.type_.as_str().to_string()),
        event_time: Some(MicroTime(now)),
        reporting_controller: Some(reporter.controller.clone()),
        reporting_instance: Some(
            reporter
                .instance
                .clone()
                .unwrap_or_else(|| reporter.controller.clone()),
        ),
        regarding: Some(regarding),
        ..Event::default()
    };
    Api::<Event>::namespaced(client, &namespace)
        .create(&PostParams::default(), &event)
        .await
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(nanos: i128) -> Timestamp {
        Timestamp::from_nanosecond(nanos).unwrap()
    }

    #[test]
    fn a_short_name_is_kept_whole() {
        assert_eq!(
            event_name("sales-console", at(0x1a2b)),
            "sales-console.1a2b"
        );
    }

    #[test]
    fn the_longest_object_name_still_gives_a_valid_event_name() {
        let now = at(1_790_000_000_123_456_789);
        let suffix = format!("{:x}", now.as_nanosecond());
        // 253 characters, as the API server allows for a request's name.
        let longest = format!("{}{}", "a".repeat(200), "-b".repeat(26)) + "c";
        assert_eq!(longest.len(), 253);
        let name = event_name(&longest, now);
        assert!(name.len() <= MAX_NAME_LEN, "{} characters", name.len());
        assert!(name.ends_with(&format!(".{suffix}")));
        assert!(name.starts_with(&"a".repeat(200)));
        // Every label of a DNS subdomain starts and ends with a letter or digit.
        for label in name.split('.') {
            assert!(!label.is_empty(), "{name}");
            assert!(!label.starts_with('-') && !label.ends_with('-'), "{name}");
        }
    }

    #[test]
    fn a_cut_that_would_end_a_label_with_a_dot_or_dash_drops_it() {
        let now = at(0xffff_ffff_ffff_ffff);
        let room = MAX_NAME_LEN - 1 - 16;
        // The character at the cut is a dash, the one before it a dot.
        let name = format!("{}.-{}", "x".repeat(room - 2), "y".repeat(20));
        let event = event_name(&name, now);
        assert_eq!(event, format!("{}.ffffffffffffffff", "x".repeat(room - 2)));
    }
}
