//! Subscription filters: which events a subscription delivers, evaluated on a stored record's
//! CloudEvents attributes (`id`, `source`, `type`, `subject`) and headers (extension
//! attributes).
//!
//! Every condition that is set must hold. `types`: the event's type equals one of them.
//! `subject_begins_with` / `subject_ends_with`: prefix and suffix of the subject.
//! `attributes`: `(name, value)` pairs; pairs with the same name are alternatives, different
//! names must all match. An attribute the event does not carry matches nothing.

use crate::record::Record;

/// Longest filter value accepted.
pub const MAX_FILTER_VALUE_BYTES: usize = 1024;
/// Most conditions in one filter.
pub const MAX_FILTER_CONDITIONS: usize = 64;

/// A subscription's filter. The default (nothing set) delivers every event.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// The event's `type` must be one of these (empty: any).
    pub types: Vec<String>,
    /// The event's `subject` must begin with this.
    pub subject_begins_with: Option<String>,
    /// The event's `subject` must end with this.
    pub subject_ends_with: Option<String>,
    /// `(attribute, value)` conditions.
    pub attributes: Vec<(String, String)>,
}

fn attribute<'a>(record: &Record<'a>, name: &str) -> Option<&'a [u8]> {
    let value = match name {
        "id" => record.id,
        "source" => record.source,
        "type" => record.event_type,
        "subject" => record.subject,
        _ => {
            return record
                .headers()
                .find(|(k, _)| *k == name.as_bytes())
                .map(|(_, v)| v)
        }
    };
    (!value.is_empty()).then_some(value)
}

impl Filter {
    /// True when nothing is filtered.
    pub fn is_empty(&self) -> bool {
        self.types.is_empty()
            && self.subject_begins_with.is_none()
            && self.subject_ends_with.is_none()
            && self.attributes.is_empty()
    }

    /// Checks the filter's size and values.
    pub fn validate(&self) -> Result<(), String> {
        let conditions = self.types.len()
            + self.attributes.len()
            + usize::from(self.subject_begins_with.is_some())
            + usize::from(self.subject_ends_with.is_some());
        if conditions > MAX_FILTER_CONDITIONS {
            return Err(format!(
                "a filter may have at most {MAX_FILTER_CONDITIONS} conditions, got {conditions}"
            ));
        }
        let values = self
            .types
            .iter()
            .chain(self.subject_begins_with.iter())
            .chain(self.subject_ends_with.iter())
            .chain(self.attributes.iter().flat_map(|(k, v)| [k, v]));
        for v in values {
            if v.len() > MAX_FILTER_VALUE_BYTES {
                return Err(format!(
                    "filter values are limited to {MAX_FILTER_VALUE_BYTES} bytes"
                ));
            }
        }
        if self.attributes.iter().any(|(k, _)| k.is_empty()) {
            return Err("a filter attribute needs a name (ATTR=VALUE)".into());
        }
        Ok(())
    }

    /// True when `record` passes the filter.
    pub fn matches(&self, record: &Record<'_>) -> bool {
        if !self.types.is_empty() && !self.types.iter().any(|t| t.as_bytes() == record.event_type) {
            return false;
        }
        if let Some(prefix) = &self.subject_begins_with {
            if !record.subject.starts_with(prefix.as_bytes()) {
                return false;
            }
        }
        if let Some(suffix) = &self.subject_ends_with {
            if !record.subject.ends_with(suffix.as_bytes()) {
                return false;
            }
        }
        // Group the conditions by attribute name: any value of a group, every group.
        for (i, (name, _)) in self.attributes.iter().enumerate() {
            if self.attributes[..i].iter().any(|(n, _)| n == name) {
                continue; // this attribute's group was checked already
            }
            let actual = attribute(record, name);
            let hit = self
                .attributes
                .iter()
                .filter(|(n, _)| n == name)
                .any(|(_, v)| actual == Some(v.as_bytes()));
            if !hit {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{RecordIter, RecordWriter};

    fn encoded(event_type: &str, subject: &str, headers: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        RecordWriter {
            value: b"v",
            id: "id-1",
            source: "/src",
            event_type,
            subject,
            headers,
            ..RecordWriter::default()
        }
        .encode_into(0, &mut out);
        out
    }

    fn check(filter: &Filter, bytes: &[u8]) -> bool {
        let record = RecordIter::new(bytes).next().expect("one").expect("valid");
        filter.matches(&record)
    }

    #[test]
    fn conditions_combine() {
        let order = encoded("order.created", "eu/orders/1", &[(b"region", b"eu")]);
        let refund = encoded("refund.created", "us/refunds/2", &[]);
        assert!(check(&Filter::default(), &order));
        let by_type = Filter {
            types: vec!["order.created".into(), "order.paid".into()],
            ..Filter::default()
        };
        assert!(check(&by_type, &order));
        assert!(!check(&by_type, &refund));
        let by_subject = Filter {
            subject_begins_with: Some("eu/".into()),
            subject_ends_with: Some("/1".into()),
            ..Filter::default()
        };
        assert!(check(&by_subject, &order));
        assert!(!check(&by_subject, &refund));
        let by_attr = Filter {
            attributes: vec![
                ("region".into(), "us".into()),
                ("region".into(), "eu".into()),
                ("source".into(), "/src".into()),
            ],
            ..Filter::default()
        };
        assert!(check(&by_attr, &order));
        assert!(!check(&by_attr, &refund), "no region header: no match");
        let both = Filter {
            types: vec!["refund.created".into()],
            subject_begins_with: Some("eu/".into()),
            ..Filter::default()
        };
        assert!(!check(&both, &order));
        assert!(!check(&both, &refund));
    }
}
