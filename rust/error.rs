//! Errors of the averaging core, with messages that name the key or the node.

use std::fmt;

use crate::hash::float_repr;
use crate::key::Key;

/// The exact message for an empty list of updates.
pub const EMPTY_UPDATES_MESSAGE: &str = "Cannot average an empty list of updates.";

/// The exact message for weights whose total overflows float64.
pub const WEIGHTS_OVERFLOW_MESSAGE: &str =
    "the weights sum to more than float64 can hold (their total overflows to inf): scale them down";

/// Why a weighted average cannot be computed. Each maps to a Python `ValueError`.
#[derive(Clone, Debug, PartialEq)]
pub enum AverageError {
    /// No updates at all.
    EmptyUpdates,
    /// The number of weights differs from the number of updates.
    WeightCount { weights: usize, updates: usize },
    /// A negative or non-finite weight.
    InvalidWeight { index: usize, weight: f64 },
    /// Finite weights whose total overflows float64.
    WeightsOverflow,
    /// Two updates carry values of different shapes for one key.
    ShapeMismatch {
        key: Key<'static>,
        label: String,
        shape: Vec<usize>,
        first_label: String,
        first_shape: Vec<usize>,
    },
    /// Every update that carries the key has weight zero.
    ZeroWeights { key: Key<'static> },
}

impl AverageError {
    /// The message, with keys written by `key_repr` (the Python layer uses Python's `repr`).
    pub fn message_with(&self, key_repr: &dyn Fn(&Key<'_>) -> String) -> String {
        match self {
            AverageError::EmptyUpdates => EMPTY_UPDATES_MESSAGE.to_owned(),
            AverageError::WeightCount { weights, updates } => {
                format!("got {weights} weights for {updates} updates")
            }
            AverageError::InvalidWeight { index, weight } => format!(
                "weight #{index} is {}: weights must be finite and >= 0",
                float_repr(*weight)
            ),
            AverageError::WeightsOverflow => WEIGHTS_OVERFLOW_MESSAGE.to_owned(),
            AverageError::ShapeMismatch {
                key,
                label,
                shape,
                first_label,
                first_shape,
            } => format!(
                "gradient {}: shape {} from {label} does not match shape {} from {first_label}",
                key_repr(key),
                shape_repr(shape),
                shape_repr(first_shape)
            ),
            AverageError::ZeroWeights { key } => format!(
                "gradient {}: all weights of the updates that carry it are zero",
                key_repr(key)
            ),
        }
    }
}

impl fmt::Display for AverageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message_with(&|key| key.to_string()))
    }
}

impl std::error::Error for AverageError {}

/// A shape as Python writes the tuple: `()`, `(3,)`, `(2, 3)`.
pub fn shape_repr(shape: &[usize]) -> String {
    match shape {
        [single] => format!("({single},)"),
        _ => {
            let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
            format!("({})", dims.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_written_like_python_tuples() {
        assert_eq!(shape_repr(&[]), "()");
        assert_eq!(shape_repr(&[3]), "(3,)");
        assert_eq!(shape_repr(&[2, 3]), "(2, 3)");
    }

    #[test]
    fn messages_name_the_key_and_the_nodes() {
        let mismatch = AverageError::ShapeMismatch {
            key: Key::from("w").into_owned(),
            label: "node-b".into(),
            shape: vec![2],
            first_label: "node-a".into(),
            first_shape: vec![3],
        };
        assert_eq!(
            mismatch.to_string(),
            "gradient 'w': shape (2,) from node-b does not match shape (3,) from node-a"
        );
        let weight = AverageError::InvalidWeight {
            index: 1,
            weight: f64::NEG_INFINITY,
        };
        assert_eq!(
            weight.to_string(),
            "weight #1 is -inf: weights must be finite and >= 0"
        );
        assert_eq!(
            AverageError::EmptyUpdates.to_string(),
            EMPTY_UPDATES_MESSAGE
        );
    }
}
