//! Pairwise squared distances: the scores of multi-Krum.

use super::{check, squared_distance, RobustError, Updates};
use crate::parallel;

/// The `N x N` symmetric matrix of squared L2 distances between the updates (zero diagonal),
/// threaded over the pairs.
pub fn pairwise_squared_distances(updates: &Updates<'_, '_>) -> Result<Vec<Vec<f64>>, RobustError> {
    check(updates)?;
    let count = updates.len();
    let mut upper = vec![0.0; count * count];
    let items: Vec<(usize, &mut f64)> = upper
        .iter_mut()
        .enumerate()
        .filter(|(index, _)| index % count > index / count)
        .collect();
    let work: usize = updates[0].iter().map(|a| a.len()).sum::<usize>() * items.len();
    parallel::for_each(items, parallel::threads_for(work), |(index, slot)| {
        let (i, j) = (index / count, index % count);
        *slot = squared_distance(&updates[i], Some(&updates[j]));
    });
    Ok((0..count)
        .map(|i| {
            (0..count)
                .map(|j| upper[i.min(j) * count + i.max(j)])
                .collect()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::super::tests::{arrays, one_key};
    use super::*;

    #[test]
    fn symmetric_with_a_zero_diagonal() {
        let inputs = arrays(&[vec![0.0, 0.0], vec![3.0, 4.0], vec![1.0, 0.0]]);
        let matrix = pairwise_squared_distances(&one_key(&inputs)).unwrap();
        assert_eq!(
            matrix,
            [
                vec![0.0, 25.0, 1.0],
                vec![25.0, 0.0, 20.0],
                vec![1.0, 20.0, 0.0]
            ]
        );
    }
}
