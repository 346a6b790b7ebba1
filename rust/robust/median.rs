//! The coordinate-wise median.

use super::{coordinatewise, RobustError, Updates};

/// Per key and coordinate, the median of the updates' values (see the module docs for the
/// arithmetic: `x + 0.0` read, `(a + b) * 0.5` for an even count); threaded over coordinates.
pub fn median(updates: &Updates<'_, '_>) -> Result<Vec<Vec<f64>>, RobustError> {
    let half = updates.len() / 2;
    let odd = updates.len() % 2 == 1;
    coordinatewise(updates, |rows, len, out| {
        let upper = &rows[half * len..(half + 1) * len];
        if odd {
            out.copy_from_slice(upper);
            return;
        }
        let lower = &rows[(half - 1) * len..half * len];
        for ((slot, &a), &b) in out.iter_mut().zip(lower).zip(upper) {
            *slot = (a + b) * 0.5;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::{arrays, one_key};
    use super::*;

    #[test]
    fn odd_and_even_counts_and_signed_zeros() {
        let odd = arrays(&[vec![3.0, -0.0], vec![1.0, 0.0], vec![2.0, -0.0]]);
        let result = median(&one_key(&odd)).unwrap();
        assert_eq!(result, [vec![2.0, 0.0]]);
        assert_eq!(result[0][1].to_bits(), 0, "-0.0 is read as +0.0");
        let even = arrays(&[vec![4.0], vec![1.0], vec![3.0], vec![100.0]]);
        assert_eq!(median(&one_key(&even)).unwrap(), [vec![3.5]]);
        let single = arrays(&[vec![-5.0, 7.0]]);
        assert_eq!(median(&one_key(&single)).unwrap(), [vec![-5.0, 7.0]]);
    }

    #[test]
    fn threaded_blocks_agree_with_a_plain_median() {
        let count = 5;
        let len = 3 << 18;
        let values: Vec<Vec<f64>> = (0..count)
            .map(|u| (0..len).map(|i| ((i * 7 + u * 13) % 101) as f64).collect())
            .collect();
        let inputs = arrays(&values);
        let result = median(&one_key(&inputs)).unwrap();
        for i in [0, 1, 255, 256, len / 2, len - 1] {
            let mut column: Vec<f64> = values.iter().map(|v| v[i]).collect();
            column.sort_by(f64::total_cmp);
            assert_eq!(result[0][i], column[count / 2], "coordinate {i}");
        }
    }
}
