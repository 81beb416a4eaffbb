//! Strict shapes for signed payloads (step S1, docs/release-format.md). serde reads a struct from
//! a JSON array as readily as from an object (positionally), and a map with a key twice keeps the
//! last. Neither is a form anyone signs on purpose, and either lets two readers see two documents
//! in the same bytes; so a payload is checked for its shape before it is read as its document.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{DeserializeOwned, Deserializer, MapAccess, Visitor};
use serde_json::Value;

use crate::Error;

/// The only fields of the documents that hold arrays; every other place an array stands is
/// where an object or a scalar belongs.
const ARRAY_FIELDS: &[&str] = &["keyids", "artifacts", "workloads", "images"];

/// Read `payload` as the document `what`, after S1: it is one JSON object, arrays appear only
/// as the values of the fields that are lists, and hold no arrays themselves.
pub(crate) fn strict<T: DeserializeOwned>(payload: &[u8], what: &str) -> Result<T, Error> {
    let value: Value =
        serde_json::from_slice(payload).map_err(|e| Error::Malformed(format!("{what}: {e}")))?;
    if !value.is_object() {
        return Err(Error::Malformed(format!(
            "{what}: a signed document is a JSON object of named fields, not {}",
            kind(&value)
        )));
    }
    check(&value, what)?;
    serde_json::from_slice(payload).map_err(|e| Error::Malformed(format!("{what}: {e}")))
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn check(value: &Value, what: &str) -> Result<(), Error> {
    match value {
        Value::Object(map) => {
            for (field, child) in map {
                if let Value::Array(items) = child {
                    if !ARRAY_FIELDS.contains(&field.as_str()) {
                        return Err(Error::Malformed(format!(
                            "{what}: `{field}` is an array where an object or a value belongs"
                        )));
                    }
                    for item in items {
                        if item.is_array() {
                            return Err(Error::Malformed(format!(
                                "{what}: `{field}` holds an array where an object or a value belongs"
                            )));
                        }
                        check(item, what)?;
                    }
                } else {
                    check(child, what)?;
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// `#[serde(deserialize_with = "unique_keys")]`: a map in which a key appears twice is refused,
/// not silently reduced to its last entry.
pub(crate) fn unique_keys<'de, D, K, V>(deserializer: D) -> Result<BTreeMap<K, V>, D::Error>
where
    D: Deserializer<'de>,
    K: Deserialize<'de> + Ord + fmt::Display,
    V: Deserialize<'de>,
{
    struct Unique<K, V>(PhantomData<(K, V)>);

    impl<'de, K, V> Visitor<'de> for Unique<K, V>
    where
        K: Deserialize<'de> + Ord + fmt::Display,
        V: Deserialize<'de>,
    {
        type Value = BTreeMap<K, V>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an object with every key once")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
            let mut map = BTreeMap::new();
            while let Some((key, value)) = access.next_entry::<K, V>()? {
                if map.contains_key(&key) {
                    return Err(serde::de::Error::custom(format!("key {key} appears twice")));
                }
                map.insert(key, value);
            }
            Ok(map)
        }
    }

    deserializer.deserialize_map(Unique(PhantomData))
}
