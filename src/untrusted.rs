//! Text that came from outside — a producer's bytes, a worker's stderr or stdout — made safe to
//! show: in the operator's terminal (`turnd parked show`) and in the daemon's log, where a
//! control sequence could retitle the window, rewrite earlier lines, fake a prompt or forge a
//! log line, and a bidirectional override could reorder what is shown.

use std::borrow::Cow;

/// `s` with control characters (C0, DEL, C1) and bidirectional overrides written as
/// `\u{…}` escapes; borrowed when there is nothing to escape (the common case).
pub fn inert(s: &str) -> Cow<'_, str> {
    escape_except(s, &[])
}

/// [`inert`], keeping line breaks and tabs (a body spanning lines stays readable).
pub fn inert_lines(s: &str) -> Cow<'_, str> {
    escape_except(s, &['\n', '\t'])
}

fn escape_except<'a>(s: &'a str, keep: &[char]) -> Cow<'a, str> {
    let unsafe_char = |c: char| {
        !keep.contains(&c)
            && (c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'))
    };
    if !s.chars().any(unsafe_char) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if unsafe_char(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outside_bytes_cannot_drive_a_terminal() {
        let hostile = "a\u{1b}]0;pwned\u{7}b\u{1b}[2J\rc\u{9b}31m\u{202e}d\u{7f}";
        let shown = inert(hostile);
        assert!(!shown.chars().any(|c| c.is_control()), "{shown:?}");
        assert!(!shown.contains('\u{202e}'));
        assert!(shown.contains("\\u{1b}]0;pwned\\u{7}"), "{shown}");
        assert!(matches!(inert("plain ünïcode"), Cow::Borrowed(_)));
        assert_eq!(inert_lines("a\n\tb\u{1b}"), "a\n\tb\\u{1b}");
        assert_eq!(inert("a\nb"), "a\\u{a}b");
    }
}
