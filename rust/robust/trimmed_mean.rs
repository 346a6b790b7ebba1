//! The coordinate-wise trimmed mean.

use super::{coordinatewise, RobustError, Updates};

/// Per key and coordinate, the mean of the updates' values without the `trim` smallest and
/// `trim` largest: the kept values summed in ascending order from `0.0`, divided by their
/// count (see the module docs); threaded over coordinates.
pub fn trimmed_mean(updates: &Updates<'_, '_>, trim: usize) -> Result<Vec<Vec<f64>>, RobustError> {
    let count = updates.len();
    if count > 0 && 2 * trim >= count {
        return Err(RobustError::Trim {
            trim,
            updates: count,
        });
    }
    let kept = count.saturating_sub(2 * trim) as f64;
    coordinatewise(updates, |rows, len, out| {
        out.fill(0.0);
        for row in rows.chunks_exact(len).skip(trim).take(count - 2 * trim) {
            for (slot, &x) in out.iter_mut().zip(row) {
                *slot += x;
            }
        }
        for slot in out.iter_mut() {
            *slot /= kept;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::{arrays, one_key};
    use super::*;

    #[test]
    fn drops_the_extremes_of_each_coordinate() {
        let inputs = arrays(&[
            vec![1.0, 10.0],
            vec![2.0, -1e9],
            vec![1e9, 20.0],
            vec![3.0, 30.0],
            vec![-7.0, 40.0],
        ]);
        assert_eq!(
            trimmed_mean(&one_key(&inputs), 1).unwrap(),
            [vec![2.0, 20.0]]
        );
        assert_eq!(
            trimmed_mean(&one_key(&inputs), 0).unwrap()[0][0],
            ((((-7.0 + 1.0) + 2.0) + 3.0) + 1e9) / 5.0
        );
    }

    #[test]
    fn at_least_one_value_must_stay() {
        let inputs = arrays(&[vec![1.0], vec![2.0]]);
        assert_eq!(
            trimmed_mean(&one_key(&inputs), 1).unwrap_err().to_string(),
            "cannot trim 1 values per side from 2 updates (at least one must stay)"
        );
        assert_eq!(trimmed_mean(&[], 0), Err(RobustError::NoUpdates));
    }
}
