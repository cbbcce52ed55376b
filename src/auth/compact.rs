//! A compact JWS's text (RFC 7515 §7.1): its three dot-separated parts, found in one pass that
//! also checks the base64url alphabet, and their strict unpadded base64url decoding.
//!
//! The decoder accepts exactly what the `base64` crate's `URL_SAFE_NO_PAD` accepts (the
//! alphabet of RFC 4648 §5, no padding, the last character's unused bits zero, so that each byte
//! string has one encoding), and the tests hold it to that; it exists because a fresh token's
//! parts are decoded on every request, where it takes 30 % fewer instructions than the crate
//! (BENCHMARKS.md, eleventh pass).

/// A byte that is not of the base64url alphabet, in [`VALUES`].
const INVALID: u8 = 0x80;
/// The same in [`PLACED`]: a bit above a quad's 24 bits of data.
const INVALID_PLACED: u32 = 1 << 31;

/// The value of each base64url character, [`INVALID`] for every other byte.
static VALUES: [u8; 256] = {
    let mut table = [INVALID; 256];
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut i = 0;
    while i < alphabet.len() {
        table[alphabet[i] as usize] = i as u8;
        i += 1;
    }
    table
};

/// For each place in a quad of characters, each byte's value shifted to its bits of the quad's 24
/// ([`INVALID_PLACED`] for a byte outside the alphabet): a quad is four loads ORed together.
static PLACED: [[u32; 256]; 4] = {
    let mut tables = [[INVALID_PLACED; 256]; 4];
    let mut place = 0;
    while place < 4 {
        let mut b = 0;
        while b < 256 {
            if VALUES[b] != INVALID {
                tables[place][b] = (VALUES[b] as u32) << (18 - 6 * place);
            }
            b += 1;
        }
        place += 1;
    }
    tables
};

fn is_alphabet(b: u8) -> bool {
    b.is_ascii_alphanumeric() | (b == b'-') | (b == b'_')
}

/// The three dot-separated parts of `token` and whether every byte besides the two dots is of the
/// base64url alphabet; `None` unless there are exactly two dots.
pub(crate) fn three_parts(token: &str) -> Option<(&str, &str, &str, bool)> {
    let bytes = token.as_bytes();
    let mut dots = [0usize; 2];
    let mut count = 0usize;
    let mut alphabet = true;
    let mut visit = |at: usize, b: u8| {
        if b == b'.' {
            if let Some(dot) = dots.get_mut(count) {
                *dot = at;
            }
            count += 1;
        } else if !is_alphabet(b) {
            alphabet = false;
        }
    };
    let (chunks, tail) = bytes.as_chunks::<16>();
    for (i, chunk) in chunks.iter().enumerate() {
        // Sixteen bytes of the alphabet at once (compiled to vector compares), which is all of a
        // token but the chunks that hold its two dots.
        if chunk.iter().fold(true, |all, &b| all & is_alphabet(b)) {
            continue;
        }
        for (j, &b) in chunk.iter().enumerate() {
            visit(i * 16 + j, b);
        }
    }
    for (j, &b) in tail.iter().enumerate() {
        visit(chunks.len() * 16 + j, b);
    }
    if count != 2 {
        return None;
    }
    let [first, second] = dots;
    Some((
        &token[..first],
        &token[first + 1..second],
        &token[second + 1..],
        alphabet,
    ))
}

/// Decodes unpadded base64url strictly (see the module's documentation); `None` for anything
/// else.
pub(crate) fn decode(text: &str) -> Option<Vec<u8>> {
    let input = text.as_bytes();
    let (quads, rest) = input.as_chunks::<4>();
    let tail_len = match rest.len() {
        0 => 0,
        2 => 1,
        3 => 2,
        _ => return None,
    };
    let mut out = vec![0u8; quads.len() * 3 + tail_len];
    let (triples, out_tail) = out.as_chunks_mut::<3>();
    // Every quad ORed together: one character outside the alphabet sets INVALID_PLACED.
    let mut seen = 0u32;
    for (triple, &[a, b, c, d]) in triples.iter_mut().zip(quads) {
        let n = PLACED[0][usize::from(a)]
            | PLACED[1][usize::from(b)]
            | PLACED[2][usize::from(c)]
            | PLACED[3][usize::from(d)];
        seen |= n;
        let [_, x, y, z] = n.to_be_bytes();
        *triple = [x, y, z];
    }
    if seen & INVALID_PLACED != 0 {
        return None;
    }
    // The last two or three characters: 12 bits for one byte or 18 for two; the bits beyond
    // the last whole byte must be zero.
    let mut n = 0u32;
    for &x in rest {
        let v = VALUES[usize::from(x)];
        if v == INVALID {
            return None;
        }
        n = n << 6 | u32::from(v);
    }
    let unused = rest.len() * 6 - tail_len * 8;
    if n & ((1 << unused) - 1) != 0 {
        return None;
    }
    out_tail.copy_from_slice(&(n >> unused).to_be_bytes()[4 - tail_len..]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::{decode, three_parts};
    use crate::auth::tests::util::Rng;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

    fn reference(text: &str) -> Option<Vec<u8>> {
        URL_SAFE_NO_PAD.decode(text).ok()
    }

    #[test]
    fn every_ending_of_two_or_three_characters_decodes_as_the_base64_crate_decodes_it() {
        // Every pair and triple of the alphabet, after a whole quad and alone: the canonical
        // ones decode, the ones whose unused low bits are set do not.
        let (mut accepted, mut triples) = (0, 0);
        for &a in ALPHABET {
            for &b in ALPHABET {
                let pair = String::from_utf8(vec![a, b]).unwrap();
                for text in [pair.clone(), format!("QUJD{pair}")] {
                    assert_eq!(decode(&text), reference(&text), "{text}");
                }
                for &c in ALPHABET {
                    let text = String::from_utf8(vec![b'Q', b'U', b'J', b'D', a, b, c]).unwrap();
                    let ours = decode(&text);
                    assert_eq!(ours, reference(&text), "{text}");
                    accepted += usize::from(ours.is_some());
                    triples += 1;
                }
            }
        }
        // Three characters carry 18 bits for 16: one in four triples is canonical.
        assert_eq!((accepted, triples), (64 * 64 * 16, 64 * 64 * 64));
    }

    #[test]
    fn random_texts_decode_as_the_base64_crate_decodes_them() {
        // Mostly the alphabet, sometimes a byte that is not: padding, the standard alphabet's
        // `+` and `/`, a dot, a space, a control character, a non-ASCII letter.
        const OTHERS: [&str; 8] = ["=", "+", "/", ".", " ", "\n", "é", "\u{0}"];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let (mut valid, texts) = (0, 20_000);
        for _ in 0..texts {
            let len = rng.below(48);
            let text: String = (0..len)
                .map(|_| {
                    if rng.below(60) == 0 {
                        rng.pick(&OTHERS).to_owned()
                    } else {
                        char::from(ALPHABET[rng.below(64)]).to_string()
                    }
                })
                .collect();
            let ours = decode(&text);
            assert_eq!(ours, reference(&text), "{text:?}");
            valid += usize::from(ours.is_some());
        }
        // Both outcomes were exercised, many times.
        let invalid = texts - valid;
        assert!(
            valid > 2_000 && invalid > 2_000,
            "{valid} valid, {invalid} invalid"
        );
        assert_eq!(decode(""), Some(Vec::new()));
    }

    #[test]
    fn a_token_splits_at_its_two_dots_wherever_they_fall_and_bad_bytes_are_seen_everywhere() {
        // Lengths around the sixteen-byte chunks, dots in every place, and one byte outside
        // the alphabet in every place.
        for len in 2..70 {
            for first in 0..len {
                for second in first + 1..len {
                    let mut bytes = vec![b'a'; len];
                    bytes[first] = b'.';
                    bytes[second] = b'.';
                    let token = String::from_utf8(bytes.clone()).unwrap();
                    let parts: Vec<&str> = token.split('.').collect();
                    assert_eq!(
                        three_parts(&token),
                        Some((parts[0], parts[1], parts[2], true)),
                        "{token}"
                    );
                    for bad in (0..len).filter(|&i| i != first && i != second) {
                        let mut bytes = bytes.clone();
                        bytes[bad] = b'=';
                        let token = String::from_utf8(bytes).unwrap();
                        assert_eq!(three_parts(&token).map(|p| p.3), Some(false), "{token}");
                    }
                }
            }
        }
        for token in ["", "abc", "a.b", "a.b.c.d", "...", "a.b.c.", ".a.b.c"] {
            assert_eq!(three_parts(token), None, "{token}");
        }
        assert_eq!(three_parts(".."), Some(("", "", "", true)));
        assert_eq!(three_parts("é.b.c").map(|p| p.3), Some(false));
    }
}
