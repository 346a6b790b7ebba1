//! Squared distances of the updates to a centre: CenteredClip's clipping weights and the
//! update norms of norm clipping.

use super::{check, squared_distance, RobustError, Updates};
use crate::array::Array;
use crate::parallel;

/// Each update's squared L2 distance to `center` (the arrays of one update, same shapes), or
/// its squared norm when `center` is `None`; threaded over the updates.
pub fn squared_distances(
    updates: &Updates<'_, '_>,
    center: Option<&[&Array<'_>]>,
) -> Result<Vec<f64>, RobustError> {
    check(updates)?;
    if let Some(center) = center {
        let mut with_center: Vec<Vec<&Array<'_>>> = vec![center.to_vec()];
        with_center.extend(updates.iter().take(1).cloned());
        check(&with_center)?;
    }
    let work: usize = updates.iter().flatten().map(|a| a.len()).sum();
    let mut distances = vec![0.0; updates.len()];
    let items: Vec<(usize, &mut f64)> = distances.iter_mut().enumerate().collect();
    parallel::for_each(items, parallel::threads_for(work), |(index, slot)| {
        *slot = squared_distance(&updates[index], center);
    });
    Ok(distances)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{arrays, one_key};
    use super::*;

    #[test]
    fn distances_to_a_centre_and_norms() {
        let inputs = arrays(&[vec![3.0, 4.0], vec![1.0, 1.0]]);
        let updates = one_key(&inputs);
        assert_eq!(squared_distances(&updates, None).unwrap(), [25.0, 2.0]);
        let center = Array::floats(vec![1.0, 1.0]);
        assert_eq!(
            squared_distances(&updates, Some(&[&center])).unwrap(),
            [13.0, 0.0]
        );
        let wrong = Array::floats(vec![1.0]);
        assert!(squared_distances(&updates, Some(&[&wrong])).is_err());
    }
}
