//! Making untrusted text fit the one-line messages every error here is.

use std::fmt::Display;

/// `error`'s message with its control characters escaped (`\n` becomes the
/// two characters `\` `n`), so it stays one line. Parsers quote the input
/// they refuse (serde_json names an unknown variant verbatim), and that
/// input comes from a snapshot file or a migration peer.
pub fn one_line(error: impl Display) -> String {
    let mut line = String::new();
    for c in error.to_string().chars() {
        if c.is_control() {
            line.extend(c.escape_default());
        } else {
            line.push(c);
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn control_characters_are_escaped_and_other_text_is_kept() {
        assert_eq!(one_line("plain: é ok"), "plain: é ok");
        assert_eq!(
            one_line("unknown variant `v\nw1\r\x07`"),
            "unknown variant `v\\nw1\\r\\u{7}`"
        );
    }

    #[test]
    fn a_serde_error_quoting_a_newline_becomes_one_line() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        enum Kind {
            Memory,
        }
        let err = serde_json::from_str::<Kind>("\"a\\nb\"").unwrap_err();
        assert!(err.to_string().contains('\n'), "the premise: {err}");
        let line = one_line(&err);
        assert!(!line.contains('\n') && line.contains("a\\nb"), "{line}");
    }
}
