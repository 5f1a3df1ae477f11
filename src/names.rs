//! The names users give to things: topics, subscriptions, consumer groups. One set of rules,
//! since each becomes a directory or file name under the data directory.

/// Longest topic name accepted.
pub const MAX_TOPIC_NAME_LEN: usize = 200;

/// Checks a topic name: 1..=200 characters of `[A-Za-z0-9._-]`, not `.` or `..`.
pub fn validate_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_TOPIC_NAME_LEN {
        return Err(format!(
            "topic name must be 1..={MAX_TOPIC_NAME_LEN} characters, got {}",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("topic name '{name}' is reserved"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "topic name may only hold [A-Za-z0-9._-], found {c:?}"
        ));
    }
    Ok(())
}

/// Checks a subscription or consumer-group name: the topic-name rules.
pub fn validate_name(what: &str, name: &str) -> Result<(), String> {
    validate_topic_name(name).map_err(|e| e.replacen("topic name", &format!("{what} name"), 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names() {
        assert!(validate_topic_name("orders.v1_eu-west").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", "ü"] {
            assert!(validate_topic_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_topic_name(&"x".repeat(201)).is_err());
    }

    #[test]
    fn subscription_names_say_what_they_name() {
        let e = validate_name("subscription", "a b").unwrap_err();
        assert!(e.starts_with("subscription name"), "{e}");
    }
}
