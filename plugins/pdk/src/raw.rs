//! Rewriting a JSON object without building a tree: its top-level members
//! as borrowed raw values, and a writer that copies them through verbatim.
//! Translating a request that carries a 2 MB image then costs one scan and
//! one copy, not a parse into `serde_json::Value` and a re-serialization.

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// The top-level members of a JSON object, in order, values unparsed.
/// A key given twice is an error: which one the upstream would read is
/// not defined.
pub fn members(body: &[u8]) -> Result<Vec<(Cow<'_, str>, &RawValue)>, serde_json::Error> {
    struct Members;
    impl<'de> Visitor<'de> for Members {
        type Value = Vec<(Cow<'de, str>, &'de RawValue)>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out: Self::Value = Vec::new();
            while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                if out.iter().any(|(k, _)| *k == key) {
                    return Err(serde::de::Error::custom(format_args!("duplicate key `{key}`")));
                }
                let value: &'de RawValue = map.next_value()?;
                out.push((key, value));
            }
            Ok(out)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let members = (&mut de).deserialize_map(Members)?;
    de.end()?;
    Ok(members)
}

/// Writes a JSON object member by member.
pub struct ObjectWriter {
    out: Vec<u8>,
    first: bool,
}

impl ObjectWriter {
    /// An empty object with room for `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Self {
        let mut out = Vec::with_capacity(capacity);
        out.push(b'{');
        Self { out, first: true }
    }

    fn key(&mut self, key: &str) {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        // Writing a string into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut self.out, key);
        self.out.push(b':');
    }

    /// A member whose value is serialized.
    pub fn member<T: serde::Serialize + ?Sized>(&mut self, key: &str, value: &T) {
        self.key(key);
        let _ = serde_json::to_writer(&mut self.out, value);
    }

    /// A member whose value is copied as it was received.
    pub fn raw_member(&mut self, key: &str, value: &RawValue) {
        self.key(key);
        self.out.extend_from_slice(value.get().as_bytes());
    }

    /// The finished object.
    pub fn finish(mut self) -> Vec<u8> {
        self.out.push(b'}');
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_keep_order_and_raw_text_and_refuse_duplicates() {
        let body = br#" {"b": [1, 2],"a\u0041":{"x" : 1}, "c":"s"} "#;
        let m = members(body).expect("object");
        let keys: Vec<&str> = m.iter().map(|(k, _)| k.as_ref()).collect();
        assert_eq!(keys, ["b", "aA", "c"]);
        assert_eq!(m[1].1.get(), r#"{"x" : 1}"#);
        let mut w = ObjectWriter::with_capacity(16);
        for (k, v) in &m {
            w.raw_member(k, v);
        }
        w.member("d", &true);
        assert_eq!(w.finish(), br#"{"b":[1, 2],"aA":{"x" : 1},"c":"s","d":true}"#);
        assert!(members(br#"{"a":1,"a":2}"#).is_err());
        assert!(members(br#"[1]"#).is_err());
        assert!(members(br#"{"a":1} x"#).is_err());
    }
}
