//! The canonical JSON text, written a range of numbers at a time.
//!
//! The text is what `json.dumps(value, sort_keys=True)` writes: `", "` and `": "` separators,
//! keys escaped with `ensure_ascii`, floats as `float.__repr__`, ints in decimal. Every byte of
//! it belongs to one number of the document (numbered in document order): the number it
//! precedes, or, for the text after the last number (closing brackets, `}`), the end. A
//! [`RangeWriter`] writes exactly the bytes that belong to the numbers `start..end` (and the
//! end's, when `end` is the last), so the texts of consecutive ranges concatenate to the whole
//! text, and ranges can be written on different threads and hashed in order.

use super::float_repr::{copy_short, write_float, FLOAT_ROOM, MAX_FLOAT_LEN};
use super::Value;
use crate::array::{Array, ArrayData, F16};
use crate::key::Key;

/// A growable buffer of text, reused from block to block.
#[derive(Default)]
pub struct Text {
    /// Zero-filled storage; its first `len` bytes are the text.
    bytes: Vec<u8>,
    len: usize,
}

impl Text {
    /// The text written so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// Forget the text, keeping the storage.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// The unwritten storage, at least `len` bytes of it.
    #[inline]
    fn room(&mut self, len: usize) -> &mut [u8] {
        if self.bytes.len() - self.len < len {
            let grown = (self.len + len).max(2 * self.bytes.len());
            self.bytes.resize(grown, 0);
        }
        &mut self.bytes[self.len..]
    }

    /// Append `text`.
    #[inline]
    pub(super) fn push(&mut self, text: &[u8]) {
        self.room(text.len())[..text.len()].copy_from_slice(text);
        self.len += text.len();
    }
}

/// A number that JSON writes as `json.dumps` does for the matching Python number.
pub trait JsonNumber: Copy {
    /// The longest text [`JsonNumber::write_json`] writes.
    const MAX_LEN: usize;

    /// Bytes of `out` that [`JsonNumber::write_json`] may overwrite (at least its longest
    /// text).
    const ROOM: usize;

    /// Write the number's JSON text at the start of `out` (at least `ROOM` bytes long; bytes
    /// after the text may be overwritten); return its length.
    fn write_json(self, out: &mut [u8]) -> usize;
}

impl JsonNumber for f64 {
    const MAX_LEN: usize = MAX_FLOAT_LEN;
    const ROOM: usize = FLOAT_ROOM;

    #[inline]
    fn write_json(self, out: &mut [u8]) -> usize {
        write_float(self, out)
    }
}

/// `float32` values are written as the double of the same value, as `.tolist()` gives them.
impl JsonNumber for f32 {
    const MAX_LEN: usize = MAX_FLOAT_LEN;
    const ROOM: usize = FLOAT_ROOM;

    #[inline]
    fn write_json(self, out: &mut [u8]) -> usize {
        write_float(f64::from(self), out)
    }
}

/// `float16` values are written as the double of the same value, as `.tolist()` gives them.
impl JsonNumber for F16 {
    const MAX_LEN: usize = MAX_FLOAT_LEN;
    const ROOM: usize = FLOAT_ROOM;

    #[inline]
    fn write_json(self, out: &mut [u8]) -> usize {
        write_float(self.to_f64(), out)
    }
}

macro_rules! json_integer {
    ($($t:ty),*) => {$(
        impl JsonNumber for $t {
            const MAX_LEN: usize = 20;
            const ROOM: usize = 20;

            #[inline]
            fn write_json(self, out: &mut [u8]) -> usize {
                copy_short(out, itoa::Buffer::new().format(self).as_bytes())
            }
        }
    )*};
}

json_integer!(i64, u64);

/// Writes the text that belongs to the numbers `start..end` of a document with `total`
/// numbers into a [`Text`].
pub struct RangeWriter<'t> {
    out: &'t mut Text,
    start: usize,
    end: usize,
    total: usize,
    /// Whether the text after the last number belongs to the range: it belongs to the range
    /// that ends at the end and holds numbers, or to the one range of a document without any.
    owns_end: bool,
    /// The number the text being written belongs to (the count of numbers before it).
    at: usize,
}

impl<'t> RangeWriter<'t> {
    /// A writer of the numbers `start..end` (`end <= total`) into `out`.
    pub fn new(out: &'t mut Text, start: usize, end: usize, total: usize) -> Self {
        debug_assert!(start <= end && end <= total);
        RangeWriter {
            out,
            start,
            end,
            total,
            owns_end: end == total && (start < end || start == 0),
            at: 0,
        }
    }

    /// Whether the text being written now belongs to the range.
    #[inline]
    fn owns(&self) -> bool {
        self.start <= self.at && (self.at < self.end || (self.at == self.total && self.owns_end))
    }

    /// Whether nothing after this point belongs to the range.
    #[inline]
    fn past(&self) -> bool {
        self.at >= self.end && self.end < self.total
    }

    /// Whether a part holding `count` numbers from here can be skipped: its text belongs to
    /// its numbers and, for its closing text, to the number after it, all before the range.
    #[inline]
    fn skips(&mut self, count: usize) -> bool {
        let skip = self.at + count < self.start;
        if skip {
            self.at += count;
        }
        skip
    }

    #[inline]
    fn text(&mut self, text: &[u8]) {
        if self.owns() {
            self.out.push(text);
        }
    }

    #[inline]
    fn number<T: JsonNumber>(&mut self, x: T) {
        if self.owns() {
            let len = x.write_json(self.out.room(T::ROOM));
            self.out.len += len;
        }
        self.at += 1;
    }

    /// Write the object `{key: value, ...}`; `entries` must be sorted by key and `counts`
    /// hold how many numbers each value has.
    pub fn document(&mut self, entries: &[(Key<'_>, Value<'_>)], counts: &[usize]) {
        self.text(b"{");
        for (index, ((key, value), &count)) in entries.iter().zip(counts).enumerate() {
            if self.past() {
                return;
            }
            if self.skips(count) {
                continue;
            }
            if index > 0 {
                self.text(b", ");
            }
            if self.owns() {
                self.key(key);
            }
            self.text(b": ");
            self.value(value);
        }
        self.text(b"}");
    }

    /// Write a key as a JSON string, escaped as with `ensure_ascii=True`.
    fn key(&mut self, key: &Key<'_>) {
        self.text(b"\"");
        for code_point in key.code_points() {
            match code_point {
                0x22 => self.text(b"\\\""),
                0x5C => self.text(b"\\\\"),
                0x0A => self.text(b"\\n"),
                0x0D => self.text(b"\\r"),
                0x09 => self.text(b"\\t"),
                0x08 => self.text(b"\\b"),
                0x0C => self.text(b"\\f"),
                0x20..=0x7E => self.text(&[code_point as u8]),
                0x10000.. => {
                    let offset = code_point - 0x10000;
                    self.unicode_escape(0xD800 | (offset >> 10));
                    self.unicode_escape(0xDC00 | (offset & 0x3FF));
                }
                _ => self.unicode_escape(code_point),
            }
        }
        self.text(b"\"");
    }

    /// `\uXXXX` with lowercase hex digits, as Python writes it.
    fn unicode_escape(&mut self, unit: u32) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let digit = |shift: u32| HEX[((unit >> shift) & 0xF) as usize];
        self.text(&[b'\\', b'u', digit(12), digit(8), digit(4), digit(0)]);
    }

    fn value(&mut self, value: &Value<'_>) {
        match value {
            Value::Float(x) => self.number(*x),
            Value::Int(i) => self.number(*i),
            Value::BigInt(digits) => {
                self.text(digits.as_bytes());
                self.at += 1;
            }
            Value::List(items) => {
                self.text(b"[");
                for (index, item) in items.iter().enumerate() {
                    if self.past() {
                        return;
                    }
                    if self.skips(item.number_count()) {
                        continue;
                    }
                    if index > 0 {
                        self.text(b", ");
                    }
                    self.value(item);
                }
                self.text(b"]");
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
            ArrayData::F16(data) => self.array_of(shape, data),
            ArrayData::I64(data) => self.array_of(shape, data),
            ArrayData::U64(data) => self.array_of(shape, data),
        }
    }

    fn array_of<T: JsonNumber>(&mut self, shape: &[usize], data: &[T]) {
        if shape.is_empty() {
            self.number(data[0]);
        } else if data.is_empty() {
            // No numbers: all of its text belongs to the number after it.
            if self.owns() {
                empty_lists(self.out, shape);
            }
        } else {
            self.elements(shape, data);
        }
    }

    /// Write the elements of a non-empty array of the given shape that belong to the range,
    /// with the brackets and separators before each, and the closing brackets when the last
    /// element is written (or the range starts right after it).
    fn elements<T: JsonNumber>(&mut self, shape: &[usize], data: &[T]) {
        let first_at = self.at;
        let first = self.start.saturating_sub(first_at).min(data.len());
        let last = (self.end - first_at.min(self.end)).min(data.len());
        let row = shape[shape.len() - 1];
        let out = &mut *self.out;
        let mut index = first;
        while index < last {
            // The brackets before the row's first element (or a ", " inside a row).
            if index == 0 {
                (0..shape.len()).for_each(|_| out.push(b"["));
            } else if index % row == 0 {
                let depth = rolled_over(shape, index);
                (0..depth).for_each(|_| out.push(b"]"));
                out.push(b", ");
                (0..depth).for_each(|_| out.push(b"["));
            } else {
                out.push(b", ");
            }
            let row_end = last.min((index / row + 1) * row);
            write_row(out, &data[index..row_end]);
            index = row_end;
        }
        self.at = first_at + last;
        if last == data.len() {
            shape.iter().for_each(|_| self.text(b"]"));
        }
    }
}

/// How many dimensions close and reopen before element `index` (> 0, at the start of a row)
/// of a row-major array of `shape`: the inner dimensions whose blocks start there.
fn rolled_over(shape: &[usize], index: usize) -> usize {
    let mut block = 1;
    let mut depth = 0;
    for &dim in shape[1..].iter().rev() {
        block *= dim;
        if index % block != 0 {
            break;
        }
        depth += 1;
    }
    depth
}

/// Write `values` separated by `", "` (the first without one).
#[inline]
fn write_row<T: JsonNumber>(out: &mut Text, values: &[T]) {
    let Some((&first, rest)) = values.split_first() else {
        return;
    };
    let free = out.room(rest.len() * (T::MAX_LEN + 2) + T::ROOM);
    let mut len = first.write_json(free);
    for &x in rest {
        free[len..len + 2].copy_from_slice(b", ");
        len += 2 + x.write_json(&mut free[len + 2..]);
    }
    out.len += len;
}

/// The text of an array with no elements: `[]`, `[[], []]`, ...
fn empty_lists(out: &mut Text, shape: &[usize]) {
    out.push(b"[");
    if let Some((&len, inner)) = shape.split_first() {
        if !inner.is_empty() {
            for index in 0..len {
                if index > 0 {
                    out.push(b", ");
                }
                empty_lists(out, inner);
            }
        }
    }
    out.push(b"]");
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    fn array<'a>(shape: &[usize], data: ArrayData<'a>) -> Value<'a> {
        Value::Array(Box::new(Array::new(shape.to_vec(), data)))
    }

    fn counts(entries: &[(Key<'_>, Value<'_>)]) -> Vec<usize> {
        entries.iter().map(|(_, v)| v.number_count()).collect()
    }

    /// The text of the numbers `start..end` of a document.
    pub(in crate::hash) fn range_text(
        entries: &[(Key<'_>, Value<'_>)],
        start: usize,
        end: usize,
    ) -> String {
        let counts = counts(entries);
        let total = counts.iter().sum();
        let mut text = Text::default();
        RangeWriter::new(&mut text, start, end, total).document(entries, &counts);
        String::from_utf8(text.as_bytes().to_vec()).unwrap()
    }

    /// The whole text of a document.
    pub(in crate::hash) fn text_of(entries: &[(Key<'_>, Value<'_>)]) -> String {
        range_text(entries, 0, counts(entries).iter().sum())
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
        assert_eq!(
            single(array(&[0, 3], ArrayData::F64(vec![].into()))),
            r#"{"k": []}"#
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
            single(array(
                &[1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
                ArrayData::I64(vec![7].into())
            )),
            r#"{"k": [[[[[[[[[[7]]]]]]]]]]}"#
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
        assert_eq!(
            single(array(
                &[2],
                ArrayData::F16(vec![F16(0x2e66), F16(0x0001)].into())
            )),
            r#"{"k": [0.0999755859375, 5.960464477539063e-08]}"#
        );
    }

    /// A document with every kind of part: keys without numbers, empty arrays between
    /// numbers, N-D arrays, ragged lists, scalars, big ints.
    fn varied_document() -> Vec<(Key<'static>, Value<'static>)> {
        let grid: Vec<f64> = (0..24).map(|i| f64::from(i) / 4.0).collect();
        vec![
            (Key::from("a"), Value::List(vec![])),
            (
                Key::from("b"),
                array(&[2, 3, 4], ArrayData::F64(grid.into())),
            ),
            (
                Key::from("c"),
                array(&[3, 0], ArrayData::F64(vec![].into())),
            ),
            (
                Key::from("d"),
                Value::List(vec![
                    Value::Int(1),
                    Value::List(vec![]),
                    Value::List(vec![
                        Value::Float(2.5),
                        Value::BigInt("123456789012345678901".into()),
                    ]),
                    Value::floats(vec![0.125, -0.0]),
                ]),
            ),
            (Key::from("e"), Value::Float(1e-7)),
            (
                Key::from("f"),
                array(&[1, 3], ArrayData::F32(vec![1.0f32, 2.0, 3.0].into())),
            ),
            (Key::from("g"), Value::List(vec![Value::List(vec![])])),
        ]
    }

    #[test]
    fn the_ranges_of_any_partition_concatenate_to_the_whole_text() {
        let entries = varied_document();
        let whole = text_of(&entries);
        assert!(
            whole.starts_with(r#"{"a": [], "b": [[[0.0, 0.25"#),
            "{whole}"
        );
        let total: usize = counts(&entries).iter().sum();
        // Every split into two and three parts, and every block size.
        for cut in 0..=total {
            let joined = range_text(&entries, 0, cut) + &range_text(&entries, cut, total);
            assert_eq!(joined, whole, "cut at {cut}");
            for second in cut..=total {
                let joined = range_text(&entries, 0, cut)
                    + &range_text(&entries, cut, second)
                    + &range_text(&entries, second, total);
                assert_eq!(joined, whole, "cuts at {cut}, {second}");
            }
        }
        for size in 1..=total {
            let joined: String = (0..total)
                .step_by(size)
                .map(|start| range_text(&entries, start, (start + size).min(total)))
                .collect();
            assert_eq!(joined, whole, "blocks of {size}");
        }
    }

    #[test]
    fn a_range_holds_the_separators_and_brackets_before_its_numbers() {
        let entries = varied_document();
        // Number 4 of "b" starts its second row: "]" closes row 0, "[" opens row 1.
        assert_eq!(range_text(&entries, 4, 5), "], [1.0");
        // Number 12 starts the second 3x4 block.
        assert_eq!(range_text(&entries, 12, 13), "]], [[3.0");
        // The number after "b" carries b's closing brackets, "c" whole and d's opening.
        assert_eq!(
            range_text(&entries, 24, 25),
            r#"]]], "c": [[], [], []], "d": [1"#
        );
    }
}
