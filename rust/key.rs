//! Gradient keys: the code points of a Python `str`.

use std::borrow::Cow;
use std::fmt;

/// A gradient key, stored as generalised UTF-8.
///
/// Python strings may hold lone surrogates, which UTF-8 cannot encode; a key is therefore kept
/// as the bytes Python's `str.encode("utf-8", "surrogatepass")` writes, which for every
/// ordinary string are exactly its UTF-8. Byte order equals code-point order, the order
/// Python's `sorted` gives strings.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key<'a>(Cow<'a, [u8]>);

impl<'a> Key<'a> {
    /// A key from generalised UTF-8 bytes (see the type's documentation).
    pub fn from_bytes(bytes: impl Into<Cow<'a, [u8]>>) -> Self {
        Key(bytes.into())
    }

    /// The same key, owning its bytes.
    pub fn into_owned(self) -> Key<'static> {
        Key(Cow::Owned(self.0.into_owned()))
    }

    /// The key's generalised UTF-8 bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The key's code points, surrogates included.
    pub fn code_points(&self) -> CodePoints<'_> {
        CodePoints { bytes: &self.0 }
    }
}

impl<'a> From<&'a str> for Key<'a> {
    fn from(text: &'a str) -> Self {
        Key(Cow::Borrowed(text.as_bytes()))
    }
}

/// Shows the key quoted, like Python's `repr` of an ordinary string.
impl fmt::Display for Key<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "'{}'", String::from_utf8_lossy(&self.0).escape_debug())
    }
}

/// Iterator over the code points of a [`Key`].
pub struct CodePoints<'k> {
    bytes: &'k [u8],
}

impl Iterator for CodePoints<'_> {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        let (&lead, rest) = self.bytes.split_first()?;
        let (len, initial) = match lead {
            0x00..=0x7F => (1, u32::from(lead)),
            0xC0..=0xDF => (2, u32::from(lead & 0x1F)),
            0xE0..=0xEF => (3, u32::from(lead & 0x0F)),
            _ => (4, u32::from(lead & 0x07)),
        };
        let continuation = rest.get(..len - 1).unwrap_or(rest);
        let code_point = continuation
            .iter()
            .fold(initial, |acc, &b| (acc << 6) | u32::from(b & 0x3F));
        self.bytes = &rest[continuation.len()..];
        Some(code_point)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_points_cover_every_utf8_length_and_lone_surrogates() {
        let key = Key::from("a\u{e9}\u{20ac}\u{1f600}");
        assert_eq!(
            key.code_points().collect::<Vec<_>>(),
            [0x61, 0xE9, 0x20AC, 0x1F600]
        );
        // "\ud800" as Python's surrogatepass encoder writes it.
        let lone = Key::from_bytes(&[0xED, 0xA0, 0x80][..]);
        assert_eq!(lone.code_points().collect::<Vec<_>>(), [0xD800]);
    }

    #[test]
    fn byte_order_is_code_point_order() {
        let mut keys = [
            Key::from("\u{1f600}"),
            Key::from("\u{ffff}"),
            Key::from_bytes(&[0xED, 0xA0, 0x80][..]),
            Key::from("\u{d7ff}"),
            Key::from("b"),
            Key::from("B"),
        ];
        keys.sort();
        let firsts: Vec<u32> = keys
            .iter()
            .map(|k| k.code_points().next().unwrap())
            .collect();
        assert_eq!(firsts, [0x42, 0x62, 0xD7FF, 0xD800, 0xFFFF, 0x1F600]);
    }

    #[test]
    fn display_quotes_like_python_repr() {
        assert_eq!(Key::from("layer.0").to_string(), "'layer.0'");
    }
}
