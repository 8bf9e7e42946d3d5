//! Errors in the config's words: serde's and the `config` crate's messages rewritten so
//! that they name no Rust type and say what to write, and the numbers those crates cannot
//! hold found with their key.

/// A deserialization error in the config's words: the reason alone, without the `config`
/// crate's trailing ``for key `x` `` and ``in the environment`` (the caller names where
/// the value came from) or serde's "field" (the file says "key").
pub(super) fn in_words(e: &config::ConfigError) -> String {
    match e {
        config::ConfigError::Type {
            unexpected,
            expected,
            ..
        } => format!("expected {expected}, found {unexpected}"),
        config::ConfigError::At { error, .. } => in_words(error),
        config::ConfigError::Message(m) => match m.strip_prefix("unknown field `") {
            // serde: "unknown field `adress`, expected `address` or `workers`"; the path
            // already ends with the unknown name.
            Some(rest) => match rest.split_once("`, ") {
                Some((_, expected)) => format!("unknown key, {expected}"),
                None => "unknown key".into(),
            },
            // serde: "invalid type: integer `3`, expected struct ListenSection".
            None => match m.split_once(", expected ") {
                Some((found, expected))
                    if found.starts_with("invalid type: ")
                        || found.starts_with("invalid value: ") =>
                {
                    let found = found.split_once(": ").map_or(found, |(_, f)| f);
                    let expected = match expected.strip_prefix("struct ") {
                        Some(_) => "a table",
                        None => expected,
                    };
                    format!("expected {expected}, found {found}")
                }
                _ => m.clone(),
            },
        },
        other => other.to_string(),
    }
}

/// The first number in `text` that the `config` crate cannot hold (an integer past 64-bit
/// signed, a float past `f64`), with its dotted key: that crate refuses it without naming
/// the key. `None` as well for text that is no TOML, which the crate reports itself.
pub(super) fn unreadable_number(text: &str) -> Option<(String, String)> {
    use toml::de::{DeTable, DeValue};

    fn in_table(path: &str, table: &DeTable<'_>) -> Option<(String, String)> {
        table.iter().find_map(|(key, value)| {
            let key = key.get_ref();
            let path = if path.is_empty() {
                key.to_string()
            } else {
                format!("{path}.{key}")
            };
            in_value(path, value.get_ref())
        })
    }
    fn in_value(path: String, value: &DeValue<'_>) -> Option<(String, String)> {
        match value {
            DeValue::Integer(i) if i64::from_str_radix(i.as_str(), i.radix()).is_err() => {
                Some((path, format!("{i} is out of range (at most {})", i64::MAX)))
            }
            DeValue::Float(f)
                if f.as_str()
                    .parse::<f64>()
                    .map_or(true, |v| v.is_infinite() && !f.as_str().contains("inf")) =>
            {
                Some((path, format!("{f} is out of range")))
            }
            DeValue::Array(items) => items
                .iter()
                .enumerate()
                .find_map(|(n, item)| in_value(format!("{path}[{n}]"), item.get_ref())),
            DeValue::Table(table) => in_table(&path, table),
            _ => None,
        }
    }
    in_table("", DeTable::parse(text).ok()?.get_ref())
}

/// Folds a multi-line parser message (TOML errors quote the source with a caret) into the
/// one line that start-up prints.
pub(super) fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty()
                && !l.starts_with('|')
                && l.split_once('|')
                    .is_none_or(|(n, _)| n.trim().parse::<u32>().is_err())
        })
        .collect::<Vec<_>>()
        .join(": ")
}

#[cfg(test)]
mod tests {
    use super::super::tests::parse;

    #[test]
    fn errors_speak_the_config_s_words() {
        let cases = [
            (
                "[balancer]\nstrategy = \"roundrobin\"",
                "test.toml: balancer.strategy: \"roundrobin\" is not one of round_robin, \
                 weighted_round_robin, least_requests, power_of_two",
            ),
            (
                "[health_check]\ninterval = 2",
                "test.toml: health_check.interval: expected a duration such as \"2s\", found \
                 the number 2 (a duration needs a unit: ms, s, m, h)",
            ),
            (
                "[rate_limit]\nwindow = \"soon\"",
                "test.toml: rate_limit.window: expected a duration such as \"2s\", found \
                 \"soon\" (a number and a unit: ms, s, m, h)",
            ),
            (
                "[listen]\nadress = \"x\"",
                "test.toml: listen.adress: unknown key, expected one of `address`, `workers`, ",
            ),
            (
                "[listen]\nworkers = \"many\"",
                "test.toml: listen.workers: expected an integer, found string \"many\"",
            ),
            (
                "listen = 3",
                "test.toml: listen: expected a table, found integer `3`",
            ),
        ];
        // A prefix where the message goes on to list what a section or scheme allows, which
        // grows with the features.
        for (text, want) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.starts_with(want), "{text:?} gave {err:?}, not {want:?}");
        }
        // Whatever the variants are (another may be added): each is listed, in config spelling.
        let err = parse("[rate_limit]\non_store_error = \"Allow\"")
            .unwrap_err()
            .to_string();
        let list = err
            .strip_prefix("test.toml: rate_limit.on_store_error: \"Allow\" is not one of ")
            .unwrap_or_else(|| panic!("{err}"));
        for variant in list.split(", ") {
            assert!(parse(&format!("[rate_limit]\non_store_error = \"{variant}\"")).is_ok());
        }
        assert!(list.contains("allow") && list.contains("deny"), "{err}");
    }
}
