//! Canonical SHA-256 of a gradient map.
//!
//! The digest is `sha256(json.dumps(plain(g), sort_keys=True).encode("utf-8"))`, where `plain`
//! turns arrays into `.tolist()`. The JSON text is streamed into the hasher chunk by chunk;
//! for large inputs one thread writes text while another hashes the previous chunk.

mod float_repr;
mod json_writer;

use std::borrow::Cow;
use std::sync::mpsc;
use std::thread;

use sha2::{Digest, Sha256};

pub use float_repr::float_repr;
use json_writer::{Chunk, JsonWriter};

use crate::array::Array;
use crate::key::Key;

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
    fn number_count(&self) -> usize {
        match self {
            Value::Float(_) | Value::Int(_) | Value::BigInt(_) => 1,
            Value::List(items) => items.iter().map(Value::number_count).sum(),
            Value::Array(array) => array.len(),
        }
    }
}

/// Below this many numbers, text is written and hashed on one thread.
const PIPELINE_MIN_NUMBERS: usize = 1 << 15;

/// Chunks in flight between the writing and the hashing thread.
const PIPELINE_DEPTH: usize = 4;

/// Hex SHA-256 of the canonical JSON text of the gradient map `entries` (in any order).
pub fn canonical_hash(mut entries: Vec<(Key<'_>, Value<'_>)>) -> String {
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let numbers: usize = entries.iter().map(|(_, v)| v.number_count()).sum();
    let pipelined = numbers >= PIPELINE_MIN_NUMBERS
        && thread::available_parallelism().is_ok_and(|threads| threads.get() > 1);
    let digest = if pipelined {
        pipelined_digest(&entries)
    } else {
        inline_digest(&entries)
    };
    hex(&digest)
}

/// Write and hash on the calling thread.
fn inline_digest(entries: &[(Key<'_>, Value<'_>)]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    let mut sink = |mut full: Chunk| {
        hasher.update(full.text());
        full.clear();
        full
    };
    let mut writer = JsonWriter::new(&mut sink);
    writer.document(entries);
    writer.finish();
    hasher.finalize().into()
}

/// Write on the calling thread while a second thread hashes the chunks already written.
fn pipelined_digest(entries: &[(Key<'_>, Value<'_>)]) -> [u8; 32] {
    let (full_tx, full_rx) = mpsc::sync_channel::<Chunk>(PIPELINE_DEPTH);
    let (empty_tx, empty_rx) = mpsc::sync_channel::<Chunk>(PIPELINE_DEPTH);
    for _ in 1..PIPELINE_DEPTH {
        empty_tx.send(Chunk::new()).expect("the receiver is alive");
    }
    thread::scope(|scope| {
        let hashing = scope.spawn(move || {
            let mut hasher = Sha256::new();
            for mut chunk in full_rx {
                hasher.update(chunk.text());
                chunk.clear();
                // The writer stops taking chunks once it has finished; that is fine.
                let _ = empty_tx.send(chunk);
            }
            hasher.finalize()
        });
        let mut sink = |full: Chunk| {
            full_tx.send(full).expect("the hashing thread is alive");
            empty_rx.recv().expect("the hashing thread returns chunks")
        };
        let mut writer = JsonWriter::new(&mut sink);
        writer.document(entries);
        writer.finish();
        drop(full_tx);
        hashing
            .join()
            .expect("the hashing thread does not panic")
            .into()
    })
}

fn hex(bytes: &[u8]) -> String {
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
    fn pipelined_and_inline_digests_agree() {
        let values: Vec<f64> = (0..3 * PIPELINE_MIN_NUMBERS)
            .map(|i| (i as f64).sin() * 1e-3)
            .collect();
        let entries = vec![
            (Key::from("w"), Value::floats(values)),
            (Key::from("b"), Value::Float(0.25)),
        ];
        assert_eq!(pipelined_digest(&entries), inline_digest(&entries));
    }

    #[test]
    fn big_map_hash_equals_hash_of_its_text() {
        let values: Vec<f64> = (0..2 * PIPELINE_MIN_NUMBERS)
            .map(|i| i as f64 / 7.0)
            .collect();
        let entries = vec![(Key::from("w"), Value::floats(values))];
        let text = json_writer::tests::text_of(&entries);
        assert_eq!(canonical_hash(entries), sha256_hex(&text));
    }
}
