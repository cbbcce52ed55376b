//! JSON text written by hand where a serializer would cost more than the text itself (the log
//! lines, the jwt-test answer): strings escaped exactly as serde_json escapes them.

use std::fmt;

/// `text` as a JSON string, escaped as serde_json escapes it (`"`, `\` and the control
/// characters; nothing else), so a value can never end the line or the object early.
pub(crate) fn push_json_string(out: &mut String, text: &str) {
    out.reserve(text.len() + 2);
    out.push('"');
    push_escaped(out, text);
    out.push('"');
}

/// Whether `text` has a byte that a JSON string must escape: eight bytes at a time, so a short
/// string (a log field's name or value, mostly) is one or two words rather than a loop over its
/// bytes. The last word is the last eight bytes, read again where they overlap the words before
/// (a byte checked twice is still checked); a string shorter than a word is read as its first
/// and last four bytes, or byte by byte under four: no copy into a padded word.
pub(crate) fn needs_escape(text: &str) -> bool {
    let bytes = text.as_bytes();
    if let Some(last) = bytes.last_chunk::<8>() {
        let (words, _) = bytes.as_chunks::<8>();
        return words
            .iter()
            .chain([last])
            .any(|word| any_needs_escape(u64::from_le_bytes(*word)));
    }
    match (bytes.first_chunk::<4>(), bytes.last_chunk::<4>()) {
        (Some(first), Some(last)) => any_needs_escape(
            u64::from(u32::from_le_bytes(*first)) | u64::from(u32::from_le_bytes(*last)) << 32,
        ),
        _ => bytes.iter().any(|&byte| NEEDS_ESCAPE[usize::from(byte)]),
    }
}

/// `text` escaped as the inside of a JSON string ([`push_json_string`] without the quotes).
pub(crate) fn push_escaped(out: &mut String, text: &str) {
    // Most strings need no escape at all: one copy.
    if !needs_escape(text) {
        out.push_str(text);
        return;
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = text.as_bytes();
    let mut plain = 0;
    let mut at = 0;
    while at < bytes.len() {
        // Eight bytes at a time while none of them needs escaping (most strings: none does).
        if let Some(Ok(word)) = bytes.get(at..at + 8).map(<[u8; 8]>::try_from)
            && !any_needs_escape(u64::from_le_bytes(word))
        {
            at += 8;
            continue;
        }
        let byte = bytes[at];
        if NEEDS_ESCAPE[usize::from(byte)] {
            // `at` is an ASCII byte, so both slices end on character boundaries.
            out.push_str(&text[plain..at]);
            match byte {
                b'"' => out.push_str("\\\""),
                b'\\' => out.push_str("\\\\"),
                b'\n' => out.push_str("\\n"),
                b'\r' => out.push_str("\\r"),
                b'\t' => out.push_str("\\t"),
                0x08 => out.push_str("\\b"),
                0x0c => out.push_str("\\f"),
                _ => {
                    out.push_str("\\u00");
                    out.push(char::from(HEX[usize::from(byte >> 4)]));
                    out.push(char::from(HEX[usize::from(byte & 0x0f)]));
                }
            }
            plain = at + 1;
        }
        at += 1;
    }
    out.push_str(&text[plain..]);
}

/// Writes what it is given as the inside of a JSON string, so a `Debug` or `Display` value is
/// escaped as it is formatted, without a `String` of its own first.
pub(crate) struct Escaping<'a>(pub(crate) &'a mut String);

impl fmt::Write for Escaping<'_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        push_escaped(self.0, text);
        Ok(())
    }
}

/// Whether any of the eight bytes of `word` needs escaping: one below 0x20, a `"` or a `\`.
/// The classic has-less-than test, exact for whether any byte is below `n`: a `"` or a `\` is a
/// byte below 1 once XORed with that byte. The three are ORed and tested once, without a branch
/// between them.
fn any_needs_escape(word: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let below = |v: u64, n: u64| v.wrapping_sub(ONES * n) & !v;
    let quote = word ^ (ONES * u64::from(b'"'));
    let backslash = word ^ (ONES * u64::from(b'\\'));
    (below(word, 0x20) | below(quote, 1) | below(backslash, 1)) & HIGHS != 0
}

/// The bytes a JSON string must escape: the control characters, `"` and `\` (one lookup a
/// byte, as serde_json does).
static NEEDS_ESCAPE: [bool; 256] = {
    let mut table = [false; 256];
    let mut byte = 0;
    while byte < 0x20 {
        table[byte] = true;
        byte += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

#[cfg(test)]
mod tests {
    use std::fmt::{self, Write as _};

    use super::*;

    #[test]
    fn formatted_values_are_escaped_piece_by_piece_as_a_whole_string_would_be() {
        /// A value whose `Debug` writes its text in many pieces, escapes split across them.
        struct Pieces;
        impl fmt::Debug for Pieces {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                for piece in ["a", "\"", "\\", "\n\u{1}", "é", "😀 ", "", "\u{7f}\""] {
                    f.write_str(piece)?;
                }
                write!(f, "{}", 42)
            }
        }
        let whole = format!("{Pieces:?}");
        let mut ours = String::from("\"");
        write!(Escaping(&mut ours), "{Pieces:?}").unwrap();
        ours.push('"');
        assert_eq!(ours, serde_json::to_string(&whole).unwrap());
    }

    #[test]
    fn an_escape_anywhere_in_a_longer_string_is_found() {
        for special in [
            "\u{0}", "\u{1f}", "\"", "\\", "\n", "\u{7f}", " ", "é", "😀", "\u{2028}",
        ] {
            // Every place in strings of 1 to 25 characters: whole words, a short last word, and
            // strings shorter than a word.
            for len in 1..=25 {
                for at in 0..len {
                    let text = format!("{}{special}{}", "a".repeat(at), "b".repeat(len - 1 - at));
                    let mut ours = String::new();
                    push_json_string(&mut ours, &text);
                    assert_eq!(ours, serde_json::to_string(&text).unwrap(), "{text:?}");
                    let escaped = serde_json::to_string(&text).unwrap() != format!("\"{text}\"");
                    assert_eq!(needs_escape(&text), escaped, "{text:?}");
                }
            }
        }
    }

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        let mut every_ascii = String::new();
        for byte in 0u8..=0x7f {
            let one = char::from(byte).to_string();
            every_ascii.push_str(&one);
            let mut ours = String::new();
            push_json_string(&mut ours, &one);
            assert_eq!(
                ours,
                serde_json::to_string(&one).unwrap(),
                "byte {byte:#04x}"
            );
        }
        for text in [
            every_ascii.as_str(),
            "",
            "é\u{2028}\u{2029}😀\u{fffd}",
            "\\\"\\",
        ] {
            let mut ours = String::from("x");
            push_json_string(&mut ours, text);
            assert_eq!(ours, format!("x{}", serde_json::to_string(text).unwrap()));
        }
    }
}
