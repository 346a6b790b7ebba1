//! Sign balance and direction of the updates: the statistics of the robust rules' outlier
//! filters (the balance filter and the direction reputation of `aumai_fedtrain.robust`).

use super::{
    add_in_lanes, add_squared_differences, check, combine_lanes, RobustError, Updates, BLOCK, LANES,
};
use crate::array::Array;
use crate::{parallel, simd};

/// One update's statistics against a centre and a reference map.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Balance {
    /// Values strictly below the centre's value of the same coordinate (0 without a centre).
    pub below: u64,
    /// Values strictly above the centre's value of the same coordinate (0 without a centre).
    pub above: u64,
    /// The dot product with the reference map (0.0 without one).
    pub dot: f64,
    /// The update's squared L2 norm (the bits of [`super::squared_distances`] without a centre).
    pub squared_norm: f64,
}

/// Per update, in one threaded pass over its values: how many lie strictly below and strictly
/// above `center` (ties count on neither side), its dot product with `reference` and its
/// squared norm. The dot product and the norm sum per key in [`LANES`] lanes (value `i` into
/// lane `i % 8`, in order), combine the lanes as `((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 +
/// l7))` and add the keys' sums in key order from `0.0`. `center` and `reference` must have
/// the updates' shapes.
pub fn balance(
    updates: &Updates<'_, '_>,
    center: Option<&[&Array<'_>]>,
    reference: Option<&[&Array<'_>]>,
) -> Result<Vec<Balance>, RobustError> {
    check(updates)?;
    for map in [center, reference].into_iter().flatten() {
        let mut with_map: Vec<Vec<&Array<'_>>> = vec![map.to_vec()];
        with_map.extend(updates.iter().take(1).cloned());
        check(&with_map)?;
    }
    let work: usize = updates.iter().flatten().map(|a| a.len()).sum();
    let mut results = vec![Balance::default(); updates.len()];
    let items: Vec<(usize, &mut Balance)> = results.iter_mut().enumerate().collect();
    parallel::for_each(items, parallel::threads_for(work), |(index, slot)| {
        *slot = update_balance(&updates[index], center, reference);
    });
    Ok(results)
}

fn update_balance(
    update: &[&Array<'_>],
    center: Option<&[&Array<'_>]>,
    reference: Option<&[&Array<'_>]>,
) -> Balance {
    const ZEROS: [f64; BLOCK] = [0.0; BLOCK];
    let mut result = Balance::default();
    let mut buffers = [[0.0; BLOCK]; 3];
    let [x_buffer, c_buffer, r_buffer] = &mut buffers;
    for (key, array) in update.iter().enumerate() {
        let (x, len) = (array.data(), array.len());
        let (mut dots, mut squares) = ([0.0f64; LANES], [0.0f64; LANES]);
        for start in (0..len).step_by(BLOCK) {
            let range = start..(start + BLOCK).min(len);
            let xs = x.doubles(range.clone(), x_buffer);
            if let Some(center) = center {
                let cs = center[key].data().doubles(range.clone(), c_buffer);
                for (&value, &middle) in xs.iter().zip(cs) {
                    result.below += u64::from(value < middle);
                    result.above += u64::from(value > middle);
                }
            }
            let rs = reference.map(|r| r[key].data().doubles(range.clone(), r_buffer));
            simd::dispatch(
                #[inline(always)]
                || {
                    add_squared_differences(&mut squares, xs, &ZEROS[..xs.len()]);
                    if let Some(rs) = rs {
                        add_in_lanes(&mut dots, xs, rs, |x, y| x * y);
                    }
                },
            );
        }
        result.dot += combine_lanes(&dots);
        result.squared_norm += combine_lanes(&squares);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::super::squared_distances;
    use super::super::tests::{arrays, one_key};
    use super::*;
    use crate::array::ArrayData;

    #[test]
    fn counts_exclude_ties_and_sums_follow_the_lanes() {
        let inputs = arrays(&[vec![1.0, 2.0, 3.0], vec![0.0, 2.0, 5.0]]);
        let updates = one_key(&inputs);
        let center = Array::floats(vec![1.0, 2.0, 4.0]);
        let reference = Array::floats(vec![2.0, -1.0, 0.5]);
        let result = balance(&updates, Some(&[&center]), Some(&[&reference])).unwrap();
        assert_eq!((result[0].below, result[0].above), (1, 0));
        assert_eq!((result[1].below, result[1].above), (1, 1));
        assert_eq!(result[0].dot, 2.0 - 2.0 + 1.5);
        assert_eq!(result[1].dot, -2.0 + 2.5);
        let norms = squared_distances(&updates, None).unwrap();
        assert_eq!(result[0].squared_norm.to_bits(), norms[0].to_bits());
        assert_eq!(result[1].squared_norm.to_bits(), norms[1].to_bits());
        let bare = balance(&updates, None, None).unwrap();
        assert_eq!((bare[0].below, bare[0].above, bare[0].dot), (0, 0, 0.0));
    }

    #[test]
    fn long_float32_keys_sum_in_lanes_and_mismatched_maps_are_errors() {
        let values: Vec<f32> = (0..1003).map(|i| ((i as f32) * 0.37).sin()).collect();
        let wide: Vec<f64> = values.iter().map(|&x| f64::from(x)).collect();
        let mut lanes = [0.0f64; LANES];
        for (i, x) in wide.iter().enumerate() {
            lanes[i % LANES] += x * 0.5;
        }
        let update = Array::new(vec![1003], ArrayData::F32(values.into()));
        let half = Array::floats(vec![0.5; 1003]);
        let zeros = Array::floats(vec![0.0; 1003]);
        let updates = vec![vec![&update]];
        let result = balance(&updates, Some(&[&zeros]), Some(&[&half])).unwrap();
        assert_eq!(result[0].dot.to_bits(), combine_lanes(&lanes).to_bits());
        let positive = wide.iter().filter(|&&x| x > 0.0).count() as u64;
        let negative = wide.iter().filter(|&&x| x < 0.0).count() as u64;
        assert_eq!((result[0].above, result[0].below), (positive, negative));
        let short = Array::floats(vec![0.0; 3]);
        assert!(balance(&updates, Some(&[&short]), None).is_err());
        assert!(balance(&updates, None, Some(&[&short])).is_err());
        assert_eq!(balance(&[], None, None), Err(RobustError::NoUpdates));
    }
}
