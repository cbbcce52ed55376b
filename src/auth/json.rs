//! Strict JSON parsing: duplicate object members are an error at every depth.
//!
//! `serde_json` silently keeps the last of two equal member names. Two parsers that disagree
//! on which duplicate wins are a classic JWT confusion (one component checks `alg`, another
//! uses it), so token headers, claims and JWKS documents are parsed with this instead.

use serde::de::{self, Deserialize, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use std::fmt;

/// Parses `bytes` as JSON, rejecting duplicate member names anywhere in the document.
pub fn from_slice_strict(bytes: &[u8]) -> Result<Value, serde_json::Error> {
    let StrictValue(value) = serde_json::from_slice(bytes)?;
    Ok(value)
}

/// Parses `bytes` as a JSON object (strictly, see [`from_slice_strict`]).
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

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // serde_json never yields a non-finite float, so `from_f64` cannot fail here;
        // fall back to null rather than panic.
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
