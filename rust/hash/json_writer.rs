//! Streaming writer of the canonical JSON text, in fixed-size chunks.
//!
//! The text is what `json.dumps(value, sort_keys=True)` writes: `", "` and `": "` separators,
//! keys escaped with `ensure_ascii`, floats as `float.__repr__`, ints in decimal. The writer
//! fills one chunk at a time and hands each full chunk to a sink (the SHA-256 hasher), so the
//! whole text never exists in memory.

use std::mem;

use super::float_repr::{copy_short, write_float, MAX_FLOAT_LEN};
use super::Value;
use crate::array::{Array, ArrayData};
use crate::key::Key;

/// Size of one chunk of JSON text.
pub const CHUNK_LEN: usize = 64 * 1024;

/// A fixed-size buffer of JSON text.
pub struct Chunk {
    bytes: Box<[u8]>,
    len: usize,
}

impl Chunk {
    /// An empty chunk of [`CHUNK_LEN`] bytes.
    pub fn new() -> Self {
        Chunk {
            bytes: vec![0; CHUNK_LEN].into_boxed_slice(),
            len: 0,
        }
    }

    /// The text written so far.
    pub fn text(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// Forget the text, keeping the buffer.
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

/// Receives a full chunk and returns an empty one to write on.
pub type Sink<'s> = dyn FnMut(Chunk) -> Chunk + 's;

/// A number that JSON writes as `json.dumps` does for the matching Python number.
pub trait JsonNumber: Copy {
    /// The longest text [`JsonNumber::write_json`] writes.
    const MAX_LEN: usize;

    /// Write the number's JSON text at the start of `out` (at least `MAX_LEN` bytes long);
    /// return its length.
    fn write_json(self, out: &mut [u8]) -> usize;
}

impl JsonNumber for f64 {
    const MAX_LEN: usize = MAX_FLOAT_LEN;

    #[inline]
    fn write_json(self, out: &mut [u8]) -> usize {
        write_float(self, out)
    }
}

/// `float32` values are written as the double of the same value, as `.tolist()` gives them.
impl JsonNumber for f32 {
    const MAX_LEN: usize = MAX_FLOAT_LEN;

    #[inline]
    fn write_json(self, out: &mut [u8]) -> usize {
        write_float(f64::from(self), out)
    }
}

macro_rules! json_integer {
    ($($t:ty),*) => {$(
        impl JsonNumber for $t {
            const MAX_LEN: usize = 20;

            #[inline]
            fn write_json(self, out: &mut [u8]) -> usize {
                copy_short(out, itoa::Buffer::new().format(self).as_bytes())
            }
        }
    )*};
}

json_integer!(i64, u64);

/// Writes JSON text into chunks handed to a [`Sink`].
pub struct JsonWriter<'s> {
    chunk: Chunk,
    sink: &'s mut Sink<'s>,
}

impl<'s> JsonWriter<'s> {
    /// A writer whose full chunks go to `sink`.
    pub fn new(sink: &'s mut Sink<'s>) -> Self {
        JsonWriter {
            chunk: Chunk::new(),
            sink,
        }
    }

    /// Hand the last, partly filled chunk to the sink.
    pub fn finish(mut self) {
        if self.chunk.len > 0 {
            self.flush();
        }
    }

    /// Write the object `{key: value, ...}`; `entries` must be sorted by key.
    pub fn document(&mut self, entries: &[(Key<'_>, Value<'_>)]) {
        self.ascii(b"{");
        for (index, (key, value)) in entries.iter().enumerate() {
            if index > 0 {
                self.ascii(b", ");
            }
            self.key(key);
            self.ascii(b": ");
            self.value(value);
        }
        self.ascii(b"}");
    }

    /// Make room for `len` more bytes in the current chunk.
    #[inline]
    fn room(&mut self, len: usize) {
        if CHUNK_LEN - self.chunk.len < len {
            self.flush();
        }
    }

    fn flush(&mut self) {
        let full = mem::replace(
            &mut self.chunk,
            Chunk {
                bytes: Box::new([]),
                len: 0,
            },
        );
        self.chunk = (self.sink)(full);
        debug_assert!(self.chunk.len == 0 && self.chunk.bytes.len() == CHUNK_LEN);
    }

    /// The unwritten part of the current chunk.
    #[inline]
    fn free(&mut self) -> &mut [u8] {
        &mut self.chunk.bytes[self.chunk.len..]
    }

    /// Write a short piece of text (at most 32 bytes).
    #[inline]
    fn ascii(&mut self, text: &[u8]) {
        self.room(text.len());
        self.chunk.len += copy_short(self.free(), text);
    }

    /// Write text of any length.
    fn long_text(&mut self, text: &[u8]) {
        for piece in text.chunks(CHUNK_LEN) {
            self.room(piece.len());
            self.free()[..piece.len()].copy_from_slice(piece);
            self.chunk.len += piece.len();
        }
    }

    #[inline]
    fn number<T: JsonNumber>(&mut self, x: T) {
        self.room(T::MAX_LEN);
        self.chunk.len += x.write_json(self.free());
    }

    /// Write a key as a JSON string, escaped as with `ensure_ascii=True`.
    fn key(&mut self, key: &Key<'_>) {
        self.ascii(b"\"");
        for code_point in key.code_points() {
            match code_point {
                0x22 => self.ascii(b"\\\""),
                0x5C => self.ascii(b"\\\\"),
                0x0A => self.ascii(b"\\n"),
                0x0D => self.ascii(b"\\r"),
                0x09 => self.ascii(b"\\t"),
                0x08 => self.ascii(b"\\b"),
                0x0C => self.ascii(b"\\f"),
                0x20..=0x7E => self.ascii(&[code_point as u8]),
                0x10000.. => {
                    let offset = code_point - 0x10000;
                    self.unicode_escape(0xD800 | (offset >> 10));
                    self.unicode_escape(0xDC00 | (offset & 0x3FF));
                }
                _ => self.unicode_escape(code_point),
            }
        }
        self.ascii(b"\"");
    }

    /// `\uXXXX` with lowercase hex digits, as Python writes it.
    fn unicode_escape(&mut self, unit: u32) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let digit = |shift: u32| HEX[((unit >> shift) & 0xF) as usize];
        self.ascii(&[b'\\', b'u', digit(12), digit(8), digit(4), digit(0)]);
    }

    fn value(&mut self, value: &Value<'_>) {
        match value {
            Value::Float(x) => self.number(*x),
            Value::Int(i) => self.number(*i),
            Value::BigInt(digits) => self.long_text(digits.as_bytes()),
            Value::List(items) => {
                self.ascii(b"[");
                for (index, item) in items.iter().enumerate() {
                    if index > 0 {
                        self.ascii(b", ");
                    }
                    self.value(item);
                }
                self.ascii(b"]");
            }
            Value::Array(array) => self.array(array),
        }
    }

    /// Write an N-D array as `.tolist()` gives it: nested lists, or a bare number for 0-D.
    fn array(&mut self, array: &Array<'_>) {
        let shape = array.shape();
        match array.data() {
            ArrayData::F64(data) => self.array_of(shape, data),
            ArrayData::F32(data) => self.array_of(shape, data),
            ArrayData::I64(data) => self.array_of(shape, data),
            ArrayData::U64(data) => self.array_of(shape, data),
        }
    }

    fn array_of<T: JsonNumber>(&mut self, shape: &[usize], data: &[T]) {
        if shape.is_empty() {
            self.number(data[0]);
        } else {
            self.nested(shape, data);
        }
    }

    /// Write `data` (row-major, of the given non-empty `shape`) as nested lists.
    fn nested<T: JsonNumber>(&mut self, shape: &[usize], data: &[T]) {
        let Some((&len, inner)) = shape.split_first() else {
            unreachable!("nested is called with at least one dimension")
        };
        self.ascii(b"[");
        if inner.is_empty() {
            if let Some((&first, rest)) = data.split_first() {
                self.number(first);
                for &x in rest {
                    self.room(T::MAX_LEN + 2);
                    let free = self.free();
                    free[..2].copy_from_slice(b", ");
                    let len = x.write_json(&mut free[2..]);
                    self.chunk.len += 2 + len;
                }
            }
        } else {
            let stride: usize = inner.iter().product();
            for index in 0..len {
                if index > 0 {
                    self.ascii(b", ");
                }
                self.nested(inner, &data[index * stride..(index + 1) * stride]);
            }
        }
        self.ascii(b"]");
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    fn array<'a>(shape: &[usize], data: ArrayData<'a>) -> Value<'a> {
        Value::Array(Box::new(Array::new(shape.to_vec(), data)))
    }

    /// The JSON text of a document, collected through a sink that keeps every chunk.
    pub(in crate::hash) fn text_of(entries: &[(Key<'_>, Value<'_>)]) -> String {
        let mut text = Vec::new();
        let mut sink = |mut full: Chunk| {
            text.extend_from_slice(full.text());
            full.clear();
            full
        };
        let mut writer = JsonWriter::new(&mut sink);
        writer.document(entries);
        writer.finish();
        String::from_utf8(text).unwrap()
    }

    fn single(value: Value<'_>) -> String {
        text_of(&[(Key::from("k"), value)])
    }

    #[test]
    fn keys_are_escaped_like_ensure_ascii() {
        let key = Key::from("a\"b\\c\nd\re\tf\u{8}g\u{c}h\u{1}i\u{7f}j\u{e9}k\u{1f600}");
        let text = text_of(&[(key, Value::Int(1))]);
        assert_eq!(
            text,
            r#"{"a\"b\\c\nd\re\tf\bg\fh\u0001i\u007fj\u00e9k\ud83d\ude00": 1}"#
        );
    }

    #[test]
    fn lone_surrogate_key_is_escaped() {
        let key = Key::from_bytes(&[b'x', 0xED, 0xB0, 0x80][..]);
        assert_eq!(text_of(&[(key, Value::Int(0))]), r#"{"x\udc00": 0}"#);
    }

    #[test]
    fn empty_document_and_empty_lists() {
        assert_eq!(text_of(&[]), "{}");
        assert_eq!(single(Value::List(vec![])), r#"{"k": []}"#);
        assert_eq!(
            single(array(&[2, 0], ArrayData::F64(vec![].into()))),
            r#"{"k": [[], []]}"#
        );
    }

    #[test]
    fn scalars_lists_and_big_ints() {
        let list = Value::List(vec![
            Value::Int(-3),
            Value::Float(0.5),
            Value::List(vec![Value::BigInt("18446744073709551616".into())]),
        ]);
        assert_eq!(single(list), r#"{"k": [-3, 0.5, [18446744073709551616]]}"#);
        assert_eq!(single(Value::Float(f64::NAN)), r#"{"k": NaN}"#);
    }

    #[test]
    fn arrays_nest_by_shape() {
        let data = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        assert_eq!(
            single(array(&[2, 3], ArrayData::F64(data[..].into()))),
            r#"{"k": [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]}"#
        );
        assert_eq!(
            single(array(&[3, 1, 2], ArrayData::F64(data[..].into()))),
            r#"{"k": [[[1.0, 2.0]], [[3.0, 4.0]], [[5.0, 6.0]]]}"#
        );
        assert_eq!(
            single(array(&[], ArrayData::U64(vec![7].into()))),
            r#"{"k": 7}"#
        );
        assert_eq!(
            single(array(&[1, 2], ArrayData::I64(vec![i64::MIN, 0].into()))),
            r#"{"k": [[-9223372036854775808, 0]]}"#
        );
        assert_eq!(
            single(array(&[2], ArrayData::F32(vec![0.1f32, -2.0].into()))),
            r#"{"k": [0.10000000149011612, -2.0]}"#
        );
    }

    #[test]
    fn text_longer_than_a_chunk_is_split_across_chunks() {
        let values = Value::floats(vec![0.123456789; CHUNK_LEN]);
        let text = single(values);
        assert_eq!(
            text.len(),
            r#"{"k": []}"#.len() + CHUNK_LEN * 11 + (CHUNK_LEN - 1) * 2
        );
        let long_key = "é".repeat(CHUNK_LEN);
        let text = text_of(&[(Key::from(long_key.as_str()), Value::Int(1))]);
        assert_eq!(text.len(), CHUNK_LEN * 6 + r#"{"": 1}"#.len());
    }
}
