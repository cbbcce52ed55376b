//! Strict JSON parsing: duplicate object members are an error at every depth.
//!
//! `serde_json` silently keeps the last of two equal member names. Two parsers that disagree
//! on which duplicate wins are a classic JWT confusion (one component checks `alg`, another
//! uses it), so token headers, claims and JWKS documents are parsed with this instead.
//!
//! A JWKS document is read with [`key_set_from_slice`]: a duplicate inside one element of its
//! key array is that key's fault alone (RFC 7517 §4 rejects the JWK, §5 ignores a JWK of a set
//! that cannot be used), so it is reported with the element rather than failing the document.

use serde::de::{self, Deserialize, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::collections::BTreeSet;
use std::fmt;

/// The scalar visits (everything but arrays and maps) of a visitor that reads a scalar as a
/// [`Value`], passed through `$wrap`.
macro_rules! scalar_values {
    ($wrap:expr) => {
        fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
            Ok($wrap(Value::Bool(v)))
        }
        fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
            Ok($wrap(Value::from(v)))
        }
        fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
            Ok($wrap(Value::from(v)))
        }
        fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
            // serde_json never yields a non-finite float, so `from_f64` cannot fail here;
            // fall back to null rather than panic.
            Ok($wrap(
                serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number),
            ))
        }
        fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
            Ok($wrap(Value::String(v.to_owned())))
        }
        fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
            Ok($wrap(Value::String(v)))
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok($wrap(Value::Null))
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok($wrap(Value::Null))
        }
    };
}

/// The scalar visits of a visitor that keeps nothing of a scalar: each answers `$other`.
macro_rules! scalars_ignored {
    ($other:expr) => {
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok($other)
        }
    };
}

/// Parses `bytes` as JSON, rejecting duplicate member names anywhere in the document.
pub fn from_slice_strict(bytes: &[u8]) -> Result<Value, serde_json::Error> {
    let StrictValue(value) = serde_json::from_slice(bytes)?;
    Ok(value)
}

/// Parses `bytes` as a JSON object (strictly, see [`from_slice_strict`]). The reference the typed
/// readers of tokens are tested against.
#[cfg(test)]
pub fn object_from_slice_strict(bytes: &[u8]) -> Option<Map<String, Value>> {
    match from_slice_strict(bytes) {
        Ok(Value::Object(map)) => Some(map),
        _ => None,
    }
}

struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictSeed;

impl<'de> DeserializeSeed<'de> for StrictSeed {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    scalar_values!(std::convert::identity);

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(StrictSeed)? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        let mut map = Map::new();
        while let Some(key) = access.next_key::<String>()? {
            if map.contains_key(&key) {
                // The member name may come from an attacker: do not echo it.
                return Err(de::Error::custom("duplicate object member"));
            }
            let value = access.next_value_seed(StrictSeed)?;
            map.insert(key, value);
        }
        Ok(Value::Object(map))
    }
}

/// A JSON value, and the first member name (in document order) found twice in one of its
/// objects, at any depth. Of two equal names the first member is kept in `value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    /// The value.
    pub value: Value,
    /// The first name found twice in one object, if any.
    pub duplicate: Option<String>,
}

/// Parses `bytes` as JSON, reporting the first duplicate member name instead of failing on it.
pub fn from_slice_checked(bytes: &[u8]) -> Result<Checked, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let checked = CheckedSeed.deserialize(&mut de)?;
    de.end()?;
    Ok(checked)
}

/// What a JWKS document holds: its keys, each with the first duplicate found inside it, and
/// the first duplicate found anywhere else (two `keys` members, say).
#[derive(Debug, Clone, PartialEq)]
pub struct KeySet {
    /// The elements of the `keys` array of an object, or of the document when it is an array;
    /// `None` when the document is neither (or its `keys` is no array).
    pub keys: Option<Vec<Checked>>,
    /// Whether the document is an array rather than an object.
    pub bare_array: bool,
    /// The first name found twice in one object outside the elements of `keys`.
    pub duplicate: Option<String>,
}

/// Parses a JWKS document (see [`KeySet`]); fails only on what is not JSON.
pub fn key_set_from_slice(bytes: &[u8]) -> Result<KeySet, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let set = de.deserialize_any(KeySetVisitor)?;
    de.end()?;
    Ok(set)
}

struct CheckedSeed;

impl<'de> DeserializeSeed<'de> for CheckedSeed {
    type Value = Checked;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Checked, D::Error> {
        deserializer.deserialize_any(CheckedVisitor)
    }
}

fn unchecked(value: Value) -> Checked {
    Checked {
        value,
        duplicate: None,
    }
}

struct CheckedVisitor;

impl<'de> Visitor<'de> for CheckedVisitor {
    type Value = Checked;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    scalar_values!(unchecked);

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
        let mut out = Vec::new();
        let mut duplicate = None;
        while let Some(element) = seq.next_element_seed(CheckedSeed)? {
            duplicate = duplicate.or(element.duplicate);
            out.push(element.value);
        }
        Ok(Checked {
            value: Value::Array(out),
            duplicate,
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Checked, A::Error> {
        let mut map = Map::new();
        let mut duplicate = None;
        while let Some(key) = access.next_key::<String>()? {
            let member = access.next_value_seed(CheckedSeed)?;
            duplicate = duplicate.or(member.duplicate);
            if map.contains_key(&key) {
                duplicate.get_or_insert(key);
            } else {
                map.insert(key, member.value);
            }
        }
        Ok(Checked {
            value: Value::Object(map),
            duplicate,
        })
    }
}

/// An array's elements, each checked on its own.
fn checked_elements<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Vec<Checked>, A::Error> {
    let mut out = Vec::new();
    while let Some(element) = seq.next_element_seed(CheckedSeed)? {
        out.push(element);
    }
    Ok(out)
}

/// The value of a `keys` member: its elements checked one by one when it is an array.
enum Elements {
    Array(Vec<Checked>),
    Other { duplicate: Option<String> },
}

struct ElementsSeed;

impl<'de> DeserializeSeed<'de> for ElementsSeed {
    type Value = Elements;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Elements, D::Error> {
        deserializer.deserialize_any(ElementsVisitor)
    }
}

struct ElementsVisitor;

impl<'de> Visitor<'de> for ElementsVisitor {
    type Value = Elements;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    scalars_ignored!(Elements::Other { duplicate: None });
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Elements, A::Error> {
        checked_elements(seq).map(Elements::Array)
    }
    fn visit_map<A: MapAccess<'de>>(self, access: A) -> Result<Elements, A::Error> {
        let Checked { duplicate, .. } = CheckedVisitor.visit_map(access)?;
        Ok(Elements::Other { duplicate })
    }
}

struct KeySetVisitor;

impl<'de> Visitor<'de> for KeySetVisitor {
    type Value = KeySet;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    scalars_ignored!(KeySet {
        keys: None,
        bare_array: false,
        duplicate: None,
    });
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<KeySet, A::Error> {
        Ok(KeySet {
            keys: Some(checked_elements(seq)?),
            bare_array: true,
            duplicate: None,
        })
    }
    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<KeySet, A::Error> {
        let mut names = BTreeSet::new();
        let mut keys = None;
        let mut duplicate = None;
        while let Some(name) = access.next_key::<String>()? {
            let seen = names.contains(&name);
            if name == "keys" && !seen {
                match access.next_value_seed(ElementsSeed)? {
                    Elements::Array(elements) => keys = Some(elements),
                    Elements::Other { duplicate: inner } => duplicate = duplicate.or(inner),
                }
            } else {
                let member = access.next_value_seed(CheckedSeed)?;
                duplicate = duplicate.or(member.duplicate);
            }
            if seen {
                duplicate.get_or_insert(name);
            } else {
                names.insert(name);
            }
        }
        Ok(KeySet {
            keys,
            bare_array: false,
            duplicate,
        })
    }
}

/// An object member's name, borrowed from the input when it holds no escape.
struct Name<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Name<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(NameVisitor).map(Name)
    }
}

struct NameVisitor;

impl<'de> Visitor<'de> for NameVisitor {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a member name")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v))
    }
}

/// True when two names are equal (after unescaping, as the parser gives them).
fn has_duplicates(names: &mut [Cow<'_, str>]) -> bool {
    if names.len() <= 16 {
        (1..names.len()).any(|i| names[..i].contains(&names[i]))
    } else {
        names.sort_unstable();
        names.windows(2).any(|w| w[0] == w[1])
    }
}

/// Walks the members of an object, calling `member` with each name (which must take the
/// value, with `access.next_value_seed`), and fails if two names are equal: the strict rule of
/// this module, for typed readers that build no [`Value`].
pub fn strict_members<'de, A, F>(mut access: A, mut member: F) -> Result<(), A::Error>
where
    A: MapAccess<'de>,
    F: FnMut(&str, &mut A) -> Result<(), A::Error>,
{
    let mut names: Vec<Cow<'de, str>> = Vec::new();
    while let Some(Name(name)) = access.next_key()? {
        member(&name, &mut access)?;
        if names.is_empty() {
            // Room for a token's usual members at once (a Supabase access token has about
            // fifteen); an empty object allocates nothing.
            names.reserve(16);
        }
        names.push(name);
    }
    if has_duplicates(&mut names) {
        // The member name may come from an attacker: do not echo it.
        return Err(de::Error::custom("duplicate object member"));
    }
    Ok(())
}

/// Checks one JSON value by the strict rule and keeps nothing of it.
pub struct Skip;

impl<'de> DeserializeSeed<'de> for Skip {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(SkipVisitor)
    }
}

struct SkipVisitor;

impl<'de> Visitor<'de> for SkipVisitor {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    scalars_ignored!(());
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Skip)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, access: A) -> Result<(), A::Error> {
        strict_members(access, |_, access| access.next_value_seed(Skip))
    }
}

/// What a typed reader needs to know of a member's value: its kind, and for a string (or an
/// array of strings) the text. Anything else was checked by the strict rule and dropped.
#[derive(Debug, Clone, PartialEq)]
pub enum Shallow<'de> {
    /// An integer that fits `i64`.
    Int(i64),
    /// A positive integer above `i64::MAX`.
    BigUint(u64),
    /// Any other number (with a fraction or an exponent, or an integer beyond `u64`).
    Float(f64),
    /// A string.
    Str(Cow<'de, str>),
    /// An array whose elements are all strings.
    Strings(Vec<Cow<'de, str>>),
    /// `null`, a boolean, an object, or an array holding anything but strings.
    Other,
}

/// Reads one JSON value as a [`Shallow`] (the strict rule applied to all of it).
pub struct ReadShallow;

impl<'de> DeserializeSeed<'de> for ReadShallow {
    type Value = Shallow<'de>;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Shallow<'de>, D::Error> {
        deserializer.deserialize_any(ShallowVisitor)
    }
}

struct ShallowVisitor;

impl<'de> Visitor<'de> for ShallowVisitor {
    type Value = Shallow<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Shallow::Other)
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Shallow::Int(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(i64::try_from(v).map_or(Shallow::BigUint(v), Shallow::Int))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Shallow::Float(v))
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Shallow::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Shallow::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Shallow::Str(Cow::Owned(v)))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Shallow::Other)
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Shallow::Other)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut strings = Vec::new();
        while let Some(element) = seq.next_element_seed(ReadShallow)? {
            match element {
                Shallow::Str(s) => strings.push(s),
                _ => {
                    // Not an array of strings: check the rest, keep nothing.
                    while seq.next_element_seed(Skip)?.is_some() {}
                    return Ok(Shallow::Other);
                }
            }
        }
        Ok(Shallow::Strings(strings))
    }
    fn visit_map<A: MapAccess<'de>>(self, access: A) -> Result<Self::Value, A::Error> {
        strict_members(access, |_, access| access.next_value_seed(Skip))?;
        Ok(Shallow::Other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::tests::util::Rng;

    #[test]
    fn duplicates_rejected_at_any_depth() {
        assert!(from_slice_strict(br#"{"a":1,"a":2}"#).is_err());
        assert!(from_slice_strict(br#"{"x":{"a":1,"a":2}}"#).is_err());
        assert!(from_slice_strict(br#"[{"a":1,"a":1}]"#).is_err());
        // Escaped spelling of the same name is still a duplicate.
        assert!(from_slice_strict(br#"{"alg":"ES256","\u0061lg":"none"}"#).is_err());
        let v = from_slice_strict(br#"{"a":1,"b":[1,2,{"c":null}],"d":1.5}"#).unwrap();
        assert_eq!(v["b"][2]["c"], Value::Null);
        assert!(object_from_slice_strict(b"[1]").is_none());
    }

    /// The checked readers find a duplicate exactly where the strict one fails, report the
    /// first in document order, and otherwise read the same value.
    #[test]
    fn checked_readers_agree_with_the_strict_one() {
        let docs: [(&[u8], Option<&str>); 9] = [
            (br#"{"a":1,"b":[1,{"c":null}],"d":1.5,"e":"x"}"#, None),
            (br#"{"a":1,"a":2}"#, Some("a")),
            (br#"{"x":{"b":1,"b":2},"x":3}"#, Some("b")),
            (br#"{"x":3,"x":{"b":1,"b":2}}"#, Some("b")),
            (br#"[{"a":1},{"c":1,"c":1},{"d":1,"d":1}]"#, Some("c")),
            (br#"{"alg":"ES256","\u0061lg":"none"}"#, Some("alg")),
            (br#"{"keys":[],"keys":[]}"#, Some("keys")),
            (br#"[]"#, None),
            (br#""s""#, None),
        ];
        for (doc, first) in docs {
            let checked = from_slice_checked(doc).unwrap();
            assert_eq!(checked.duplicate.as_deref(), first, "{doc:?}");
            assert_eq!(from_slice_strict(doc).is_err(), first.is_some(), "{doc:?}");
            if first.is_none() {
                assert_eq!(checked.value, from_slice_strict(doc).unwrap());
            }
        }
        // Of two equal names the first member is kept.
        let checked = from_slice_checked(br#"{"a":1,"a":2}"#).unwrap();
        assert_eq!(checked.value["a"], 1);
        for bad in [&b"{"[..], b"[1,]", b"{} {}", b"{\"a\":1,\"a\":}"] {
            assert!(from_slice_checked(bad).is_err(), "{bad:?}");
            assert!(key_set_from_slice(bad).is_err(), "{bad:?}");
        }

        let set = key_set_from_slice(br#"{"keys":[{"a":1,"a":2},{"b":1}],"x":{}}"#).unwrap();
        assert_eq!(set.duplicate, None);
        assert!(!set.bare_array);
        let keys = set.keys.unwrap();
        assert_eq!(keys[0].duplicate.as_deref(), Some("a"));
        assert_eq!(keys[1].duplicate, None);
        let set = key_set_from_slice(br#"[{"a":1,"a":2}]"#).unwrap();
        assert!(set.bare_array && set.duplicate.is_none());
        for (doc, keys) in [
            (&br#"{"keys":1}"#[..], false),
            (br#"{"other":[]}"#, false),
            (br#"{"keys":[],"keys":{}}"#, true),
            (b"1", false),
        ] {
            let set = key_set_from_slice(doc).unwrap();
            assert_eq!(set.keys.is_some(), keys, "{doc:?}");
        }
    }

    /// Names that are nearly equal: empty and one-byte names, NUL bytes, the same first
    /// and last bytes with a different middle, common prefixes, characters of several bytes
    /// and their decomposed spelling, long names.
    fn tricky_names() -> Vec<String> {
        let long = |n: usize, last: char| {
            let mut name = "x".repeat(n - 1);
            name.push(last);
            name
        };
        let mut names: Vec<String> = [
            "",
            "\0",
            "\0\0",
            "a",
            "a\0",
            "a\0\0\0\0\0\0",
            "a\0\0\0\0\0\0\0",
            "exp",
            "iat",
            "aud",
            "abcdef",
            "abcdefg",
            "abcdefgh",
            "abcdefgi",
            "abcdefgh\0",
            "axc",
            "ayc",
            "aqqqc",
            "aqrqc",
            "é",
            "e\u{301}",
            "app_metadata",
            "app_metadatb",
            "user_metadata",
            "is_anonymous",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        for n in [254, 255, 256, 300] {
            names.push(long(n, 'y'));
            names.push(long(n, 'z'));
        }
        names
    }

    #[test]
    fn duplicate_check_agrees_with_a_set() {
        let pool = tricky_names();
        // Every pair alone, and after names that differ from both.
        for a in &pool {
            for b in &pool {
                let mut pair = vec![Cow::Borrowed(a.as_str()), Cow::Borrowed(b.as_str())];
                assert_eq!(has_duplicates(&mut pair), a == b, "{a:?}, {b:?}");
                let mut padded: Vec<Cow<'_, str>> =
                    (0..5).map(|i| format!("{i}-").into()).collect();
                padded.extend(pair);
                assert_eq!(
                    has_duplicates(&mut padded),
                    a == b,
                    "{a:?}, {b:?} after others"
                );
            }
        }
        // The same sets on every run.
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let (mut with, mut without) = (0, 0);
        for round in 0..20_000 {
            // Up to 16 names take the pairwise path, more the sorting one.
            let count = rng.below(if round % 2 == 0 { 17 } else { 40 });
            let set: Vec<&str> = (0..count)
                .map(|_| pool[rng.below(pool.len())].as_str())
                .collect();
            let expected = set.len() != set.iter().collect::<std::collections::HashSet<_>>().len();
            let mut names: Vec<Cow<'_, str>> = set.iter().map(|s| Cow::Borrowed(*s)).collect();
            assert_eq!(has_duplicates(&mut names), expected, "{set:?}");
            if expected {
                with += 1;
            } else {
                without += 1;
            }
        }
        // Both answers were asked for often enough to mean something.
        assert!(
            with > 1_000 && without > 1_000,
            "{with} with, {without} without"
        );
    }
}
