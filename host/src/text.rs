//! Text that comes from outside the operator (plugin messages and reasons, above all) made
//! safe for where people read it: status conditions, Events, logs and terminals.

/// Limits, in bytes, of untrusted text where it lands.
pub mod limit {
    /// A plugin's error or rejection message.
    pub const PLUGIN_MESSAGE: usize = 1024;
    /// A scaling decision's reason.
    pub const REASON: usize = 512;
    /// A condition message in the status (the API allows 32 KiB).
    pub const CONDITION: usize = 4096;
    /// An Event note (events.k8s.io allows 1 KiB).
    pub const EVENT_NOTE: usize = 1024;
}

/// What replaces a cut tail.
const ELLIPSIS: &str = "…";

/// `text` without control characters (newlines and tabs become spaces; escape sequences,
/// carriage returns, NUL, BEL and the like are dropped) or the invisible format characters
/// that reorder or hide text (bidi overrides and isolates, zero-width characters), cut to at
/// most `max_bytes` bytes at a character boundary (ending in `…` when cut).
pub fn clean(text: &str, max_bytes: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max_bytes));
    // The length `out` may be cut back to so that the ellipsis still fits.
    let mut fits_ellipsis = 0;
    for c in text.chars() {
        let c = match c {
            '\n' | '\t' => ' ',
            c if c.is_control() || is_hidden_format(c) => continue,
            c => c,
        };
        if out.len() + c.len_utf8() > max_bytes {
            out.truncate(fits_ellipsis);
            if out.len() + ELLIPSIS.len() <= max_bytes {
                out.push_str(ELLIPSIS);
            }
            return out;
        }
        out.push(c);
        if out.len() + ELLIPSIS.len() <= max_bytes {
            fits_ellipsis = out.len();
        }
    }
    out
}

/// Characters that change how text around them is shown without being visible: bidi
/// embeddings, overrides and isolates, zero-width characters, the byte-order mark.
fn is_hidden_format(c: char) -> bool {
    matches!(c,
        '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2064}'
        | '\u{2066}'..='\u{206F}' | '\u{FEFF}' | '\u{061C}')
}

/// `text` cut to at most `max_bytes` bytes at a character boundary (no other change): for
/// text that is already clean but may be long.
pub fn truncate(text: &str, max_bytes: usize) -> String {
    if text.len() <= max_bytes {
        return text.to_string();
    }
    let mut end = max_bytes.saturating_sub(ELLIPSIS.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{ELLIPSIS}", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_and_hidden_characters_are_removed() {
        let hostile = "ok\u{1b}[31mred\r\0\u{7}\u{202E}evil\u{2066}x\ny\tz\u{200B}";
        assert_eq!(clean(hostile, 100), "ok[31mredevilx y z");
    }

    #[test]
    fn text_is_cut_by_bytes_at_a_character_boundary() {
        let e = "é".repeat(1000); // 2,000 bytes
        let cut = clean(&e, limit::EVENT_NOTE);
        assert!(cut.len() <= limit::EVENT_NOTE, "{}", cut.len());
        assert!(cut.ends_with('…'));
        assert!(cut.len() > limit::EVENT_NOTE - 4);
        let cut = truncate(&e, 1024);
        assert!(cut.len() <= 1024 && cut.ends_with('…'));
        // Short text is left whole, without an ellipsis.
        assert_eq!(clean("short", 5), "short");
        assert_eq!(truncate("short", 5), "short");
        assert_eq!(clean("", 0), "");
    }

    #[test]
    fn a_huge_message_costs_no_more_than_its_limit() {
        let huge = "x".repeat(48 << 20);
        let cut = clean(&huge, limit::PLUGIN_MESSAGE);
        assert_eq!(cut.len(), limit::PLUGIN_MESSAGE);
    }
}
