//! Canonical SHA-256 of a gradient map.
//!
//! The digest is `sha256(json.dumps(plain(g), sort_keys=True).encode("utf-8"))`, where `plain`
//! turns arrays into `.tolist()`. The JSON text is never materialised: it is written in blocks
//! of [`BLOCK_NUMBERS`] numbers ([`text`]) that are hashed in order as they are written. Large
//! inputs are written by every available thread, the hashing passed from thread to thread
//! ([`ordered`]); small ones on the calling thread. Many small maps are hashed side by side,
//! one map per thread ([`canonical_hashes`]).

mod float_repr;
mod ordered;
mod shortest;
mod text;

use std::borrow::Cow;
use std::sync::OnceLock;

pub use float_repr::float_repr;
use ordered::ordered_digest;
use text::RangeWriter;

use crate::array::Array;
use crate::key::Key;
use crate::parallel;

/// One gradient value: what `plain(g)[key]` holds before JSON serialisation.
#[derive(Clone, Debug)]
pub enum Value<'a> {
    /// A Python `float`.
    Float(f64),
    /// A Python `int` that fits in 64 bits.
    Int(i64),
    /// The decimal digits of any other Python `int`, as `int.__repr__` writes them.
    BigInt(String),
    /// A list or tuple, possibly nested and ragged.
    List(Vec<Value<'a>>),
    /// An N-D array of numbers, written as its `.tolist()`.
    Array(Box<Array<'a>>),
}

impl<'a> Value<'a> {
    /// A flat list of floats.
    pub fn floats(values: impl Into<Cow<'a, [f64]>>) -> Self {
        Value::Array(Box::new(Array::floats(values)))
    }

    /// How many numbers the value holds.
    pub(crate) fn number_count(&self) -> usize {
        match self {
            Value::Float(_) | Value::Int(_) | Value::BigInt(_) => 1,
            Value::List(items) => items.iter().map(Value::number_count).sum(),
            Value::Array(array) => array.len(),
        }
    }
}

/// Below this many numbers, text is written and hashed on one thread.
const PIPELINE_MIN_NUMBERS: usize = 1 << 15;

/// Numbers per block of text (about 90 KB of it for float64 values).
const BLOCK_NUMBERS: usize = 4096;

/// A gradient map: `(key, value)` pairs in any order.
pub type Entries<'a> = Vec<(Key<'a>, Value<'a>)>;

/// Hex SHA-256 of the canonical JSON text of the gradient map `entries` (in any order).
pub fn canonical_hash(entries: Entries<'_>) -> String {
    let threads = if numbers(&entries) >= PIPELINE_MIN_NUMBERS {
        parallel::available_threads()
    } else {
        1
    };
    hex(&digest(entries, threads))
}

/// [`canonical_hash`] of each map, the maps hashed side by side on the available threads
/// (one map per thread at a time) when there are enough of them and numbers in them.
pub fn canonical_hashes(maps: Vec<Entries<'_>>) -> Vec<String> {
    let total: usize = maps.iter().map(numbers).sum();
    let threads = parallel::available_threads();
    if total < PIPELINE_MIN_NUMBERS || maps.len() < threads {
        return maps.into_iter().map(canonical_hash).collect();
    }
    let digests: Vec<OnceLock<String>> = maps.iter().map(|_| OnceLock::new()).collect();
    parallel::for_each(
        maps.into_iter().enumerate().collect(),
        threads,
        |(index, map)| {
            let _ = digests[index].set(hex(&digest(map, 1)));
        },
    );
    digests
        .into_iter()
        .map(|digest| digest.into_inner().expect("every map is hashed"))
        .collect()
}

/// How many numbers a map holds.
fn numbers(entries: &Entries<'_>) -> usize {
    entries.iter().map(|(_, value)| value.number_count()).sum()
}

/// SHA-256 of the canonical JSON text of `entries`, written on `threads` threads.
fn digest(mut entries: Entries<'_>, threads: usize) -> [u8; 32] {
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let counts: Vec<usize> = entries.iter().map(|(_, v)| v.number_count()).collect();
    let total: usize = counts.iter().sum();
    let blocks = total.div_ceil(BLOCK_NUMBERS).max(1);
    ordered_digest(blocks, threads, |index, text| {
        let start = index * BLOCK_NUMBERS;
        let end = (start + BLOCK_NUMBERS).min(total);
        RangeWriter::new(text, start, end, total).document(&entries, &counts);
    })
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes
        .iter()
        .flat_map(|&b| [DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 0xF)]])
        .map(char::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    fn sha256_hex(text: &str) -> String {
        hex(&Sha256::digest(text.as_bytes()))
    }

    #[test]
    fn empty_map_hashes_the_text_of_an_empty_object() {
        assert_eq!(canonical_hash(vec![]), sha256_hex("{}"));
    }

    #[test]
    fn keys_are_sorted_by_code_point() {
        let entries = vec![
            (Key::from("b"), Value::Int(2)),
            (Key::from("\u{1f600}"), Value::Int(4)),
            (Key::from("\u{ff5e}"), Value::Int(3)),
            (Key::from("a"), Value::floats(vec![0.5, 1e-05])),
        ];
        let expected = r#"{"a": [0.5, 1e-05], "b": 2, "\uff5e": 3, "\ud83d\ude00": 4}"#;
        assert_eq!(canonical_hash(entries), sha256_hex(expected));
    }

    #[test]
    fn threaded_and_single_thread_digests_agree() {
        let values: Vec<f64> = (0..3 * PIPELINE_MIN_NUMBERS + 5)
            .map(|i| (i as f64).sin() * 1e-3)
            .collect();
        let entries = || {
            vec![
                (Key::from("w"), Value::floats(&values[..])),
                (Key::from("b"), Value::Float(0.25)),
            ]
        };
        let single = digest(entries(), 1);
        for threads in [2, 3, 4] {
            assert_eq!(digest(entries(), threads), single);
        }
    }

    #[test]
    fn many_maps_hash_as_each_does_alone() {
        let values: Vec<f64> = (0..PIPELINE_MIN_NUMBERS).map(|i| i as f64 / 3.0).collect();
        let maps: Vec<Entries<'_>> = (0..7)
            .map(|n| vec![(Key::from("w"), Value::floats(&values[n..]))])
            .collect();
        let one_by_one: Vec<String> = maps.iter().cloned().map(canonical_hash).collect();
        assert_eq!(canonical_hashes(maps), one_by_one);
        assert!(canonical_hashes(Vec::new()).is_empty());
    }

    #[test]
    fn big_map_hash_equals_hash_of_its_text() {
        let values: Vec<f64> = (0..2 * PIPELINE_MIN_NUMBERS)
            .map(|i| i as f64 / 7.0)
            .collect();
        let entries = vec![(Key::from("w"), Value::floats(values))];
        let text = text::tests::text_of(&entries);
        assert_eq!(canonical_hash(entries), sha256_hex(&text));
    }
}
