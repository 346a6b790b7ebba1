//! Byzantine-robust aggregation kernels: the coordinate work of `aumai_fedtrain.robust`.
//!
//! Every kernel takes the round's updates as `updates[u][k]`: update `u`'s array for key `k`,
//! the keys in the same order and of the same shapes in every update. Values are read as
//! doubles (float32 and ints widened exactly as NumPy casts them) and the results are doubles.
//! The float arithmetic is specified so that the NumPy fallback gives the same bits:
//!
//! - [`median`] and [`trimmed_mean`] read every value as `x + 0.0` (so `-0.0` is `+0.0` and
//!   the sort order is total), the median of an even count is `(a + b) * 0.5`, and the trimmed
//!   mean sums the kept values in ascending order from `0.0`, then divides by their count;
//! - [`squared_distances`], [`pairwise_squared_distances`] and [`balance`] (dot products and
//!   squared norms) sum squared differences or products per key in [`LANES`] lanes (value `i` into lane `i % 8`, in order), combine the lanes as
//!   `((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))`, and add the keys' sums in key order
//!   from `0.0`.
//!
//! The kernels expect finite values (the Python layer checks them first); NaN never panics but
//! gives unspecified results.

mod balance;
mod clip;
mod krum;
mod median;
mod trimmed_mean;

use std::fmt;

use crate::array::{Array, ArrayData};
use crate::{parallel, simd};

pub use balance::{balance, Balance};
pub use clip::squared_distances;
pub use krum::pairwise_squared_distances;
pub use median::median;
pub use trimmed_mean::trimmed_mean;

/// Lanes of every sum of squares.
pub const LANES: usize = 8;

/// Coordinates gathered per step of the coordinate-wise kernels, and values widened per step
/// of the distance kernels (a multiple of [`LANES`]).
const BLOCK: usize = 256;

/// Why the updates cannot be aggregated. Each maps to a Python `ValueError`.
#[derive(Clone, Debug, PartialEq)]
pub enum RobustError {
    /// No updates at all.
    NoUpdates,
    /// An update holds another number of arrays than update #0.
    KeyCount {
        update: usize,
        count: usize,
        expected: usize,
    },
    /// An array's shape differs from update #0's for the same key.
    Shape {
        update: usize,
        entry: usize,
        shape: Vec<usize>,
        expected: Vec<usize>,
    },
    /// More values trimmed per side than a trimmed mean can drop.
    Trim { trim: usize, updates: usize },
}

impl fmt::Display for RobustError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use crate::error::shape_repr;
        match self {
            RobustError::NoUpdates => f.write_str("cannot aggregate an empty list of updates"),
            RobustError::KeyCount {
                update,
                count,
                expected,
            } => write!(
                f,
                "update #{update} has {count} gradients, update #0 has {expected}"
            ),
            RobustError::Shape {
                update,
                entry,
                shape,
                expected,
            } => write!(
                f,
                "gradient #{entry} has shape {} in update #{update}, {} in update #0",
                shape_repr(shape),
                shape_repr(expected)
            ),
            RobustError::Trim { trim, updates } => write!(
                f,
                "cannot trim {trim} values per side from {updates} updates (at least one must stay)"
            ),
        }
    }
}

impl std::error::Error for RobustError {}

/// The updates of one round: `updates[u][k]` is update `u`'s array for key `k`.
pub type Updates<'u, 'a> = [Vec<&'u Array<'a>>];

/// Check that every update holds arrays of update #0's shapes, key by key.
fn check(updates: &Updates<'_, '_>) -> Result<(), RobustError> {
    let Some(first) = updates.first() else {
        return Err(RobustError::NoUpdates);
    };
    for (update, arrays) in updates.iter().enumerate().skip(1) {
        if arrays.len() != first.len() {
            return Err(RobustError::KeyCount {
                update,
                count: arrays.len(),
                expected: first.len(),
            });
        }
        for (entry, (array, expected)) in arrays.iter().zip(first).enumerate() {
            if array.shape() != expected.shape() {
                return Err(RobustError::Shape {
                    update,
                    entry,
                    shape: array.shape().to_vec(),
                    expected: expected.shape().to_vec(),
                });
            }
        }
    }
    Ok(())
}

/// Per key, `reduce(rows, len, out)` of blocks of `len` coordinates whose values across the
/// updates are sorted: `rows[r * len + j]` is the `r`-th smallest value of coordinate `j`, each
/// read as `x + 0.0`. Threaded over pieces of coordinates; within a block, a sorting network
/// sorts every coordinate at once with vector min/max.
fn coordinatewise(
    updates: &Updates<'_, '_>,
    reduce: impl Fn(&[f64], usize, &mut [f64]) + Sync,
) -> Result<Vec<Vec<f64>>, RobustError> {
    check(updates)?;
    let count = updates.len();
    let network = sorting_network(count);
    let first = &updates[0];
    let total: usize = first.iter().map(|array| array.len() * count).sum();
    let threads = parallel::threads_for(total);
    let mut outputs: Vec<Vec<f64>> = first.iter().map(|a| vec![0.0; a.len()]).collect();
    let mut items = Vec::new();
    for (key, output) in outputs.iter_mut().enumerate() {
        let len = output.len();
        let mut rest: &mut [f64] = output;
        for range in parallel::pieces(len, count, total, threads, BLOCK) {
            let (piece, tail) = rest.split_at_mut(range.len());
            rest = tail;
            items.push((key, range.start, piece));
        }
    }
    parallel::for_each(items, threads, |(key, start, piece)| {
        let mut rows = vec![0.0; BLOCK * count];
        let mut buffer = [0.0; BLOCK];
        for (block, out) in piece.chunks_mut(BLOCK).enumerate() {
            let (from, len) = (start + block * BLOCK, out.len());
            let rows = &mut rows[..count * len];
            for (u, update) in updates.iter().enumerate() {
                let values = update[key].data().doubles(from..from + len, &mut buffer);
                for (slot, &x) in rows[u * len..(u + 1) * len].iter_mut().zip(values) {
                    *slot = x + 0.0;
                }
            }
            simd::dispatch(
                #[inline(always)]
                || {
                    sort_columns(rows, len, &network);
                    reduce(rows, len, out);
                },
            );
        }
    });
    Ok(outputs)
}

/// Batcher's odd-even merge sort for `count` values: compare-exchanges `(a, b)`, `a < b`, of
/// the network for the next power of two without those that reach past `count` (as if the
/// missing values were `+inf`, which never move).
fn sorting_network(count: usize) -> Vec<(usize, usize)> {
    let size = count.next_power_of_two();
    let mut network = Vec::new();
    let mut p = 1;
    while p < size {
        let mut k = p;
        while k >= 1 {
            let mut j = k % p;
            while j + k < size {
                for i in 0..k.min(size - j - k) {
                    let (a, b) = (i + j, i + j + k);
                    if a / (2 * p) == b / (2 * p) && b < count {
                        network.push((a, b));
                    }
                }
                j += 2 * k;
            }
            k /= 2;
        }
        p *= 2;
    }
    network
}

/// Sort every column `j` of `rows` (`rows[r * len + j]`, row `r`) by the compare-exchanges of
/// `network`, each applied to whole rows (vector min and max).
#[inline(always)]
fn sort_columns(rows: &mut [f64], len: usize, network: &[(usize, usize)]) {
    for &(a, b) in network {
        let (low, high) = rows.split_at_mut(b * len);
        let firsts = &mut low[a * len..(a + 1) * len];
        for (x, y) in firsts.iter_mut().zip(&mut high[..len]) {
            let (p, q) = (*x, *y);
            let swap = q < p;
            *x = if swap { q } else { p };
            *y = if swap { p } else { q };
        }
    }
}

/// `sum((x - y)^2)` over the updates' arrays of every key (`y` = 0 when `None`), with the
/// lane order of the module docs.
fn squared_distance(x: &[&Array<'_>], y: Option<&[&Array<'_>]>) -> f64 {
    let mut total = 0.0;
    for (key, array) in x.iter().enumerate() {
        total += key_squared_distance(array.data(), y.map(|y| y[key].data()));
    }
    total
}

fn key_squared_distance(x: &ArrayData<'_>, y: Option<&ArrayData<'_>>) -> f64 {
    const ZEROS: [f64; BLOCK] = [0.0; BLOCK];
    let mut lanes = [0.0f64; LANES];
    let (mut x_buffer, mut y_buffer) = ([0.0; BLOCK], [0.0; BLOCK]);
    for start in (0..x.len()).step_by(BLOCK) {
        let range = start..(start + BLOCK).min(x.len());
        let len = range.len();
        let xs = x.doubles(range.clone(), &mut x_buffer);
        // x - 0.0 is x, so the squared norm is the distance to zeros.
        let ys = match y {
            Some(y) => y.doubles(range, &mut y_buffer),
            None => &ZEROS[..len],
        };
        simd::dispatch(
            #[inline(always)]
            || add_squared_differences(&mut lanes, xs, ys),
        );
    }
    combine_lanes(&lanes)
}

/// The lanes' sum: `((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))`.
fn combine_lanes(lanes: &[f64; LANES]) -> f64 {
    ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
        + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))
}

/// Add `(x_i - y_i)^2` to lane `i % LANES` (`xs` starts at a multiple of [`LANES`]).
#[inline(always)]
fn add_squared_differences(lanes: &mut [f64; LANES], xs: &[f64], ys: &[f64]) {
    add_in_lanes(lanes, xs, ys, |x, y| {
        let d = x - y;
        d * d
    });
}

/// Add `term(x_i, y_i)` to lane `i % LANES` (`xs` starts at a multiple of [`LANES`]).
#[inline(always)]
fn add_in_lanes(lanes: &mut [f64; LANES], xs: &[f64], ys: &[f64], term: impl Fn(f64, f64) -> f64) {
    let mut x_chunks = xs.chunks_exact(LANES);
    let mut y_chunks = ys.chunks_exact(LANES);
    for (x, y) in x_chunks.by_ref().zip(y_chunks.by_ref()) {
        for lane in 0..LANES {
            lanes[lane] += term(x[lane], y[lane]);
        }
    }
    for (lane, (&x, &y)) in x_chunks
        .remainder()
        .iter()
        .zip(y_chunks.remainder())
        .enumerate()
    {
        lanes[lane] += term(x, y);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn arrays(values: &[Vec<f64>]) -> Vec<Array<'static>> {
        values.iter().map(|v| Array::floats(v.clone())).collect()
    }

    pub(super) fn one_key<'u>(arrays: &'u [Array<'static>]) -> Vec<Vec<&'u Array<'static>>> {
        arrays.iter().map(|a| vec![a]).collect()
    }

    #[test]
    fn updates_must_match_update_zero() {
        let a = Array::floats(vec![1.0, 2.0]);
        let b = Array::floats(vec![1.0]);
        assert_eq!(check(&[]), Err(RobustError::NoUpdates));
        let short: Vec<Vec<&Array<'_>>> = vec![vec![&a, &a], vec![&a]];
        assert_eq!(
            check(&short).unwrap_err().to_string(),
            "update #1 has 1 gradients, update #0 has 2"
        );
        let shapes: Vec<Vec<&Array<'_>>> = vec![vec![&a], vec![&b]];
        assert_eq!(
            check(&shapes).unwrap_err().to_string(),
            "gradient #0 has shape (1,) in update #1, (2,) in update #0"
        );
    }

    #[test]
    fn the_sorting_network_sorts_any_count() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % 7) as f64 - 3.0 // small range: many ties
        };
        for count in 1..=130 {
            let network = sorting_network(count);
            assert!(network.iter().all(|&(a, b)| a < b && b < count));
            let len = 5;
            let mut rows: Vec<f64> = (0..count * len).map(|_| next()).collect();
            let mut expected: Vec<Vec<f64>> = (0..len)
                .map(|j| (0..count).map(|r| rows[r * len + j]).collect())
                .collect();
            sort_columns(&mut rows, len, &network);
            for (j, column) in expected.iter_mut().enumerate() {
                column.sort_by(f64::total_cmp);
                let sorted: Vec<f64> = (0..count).map(|r| rows[r * len + j]).collect();
                assert_eq!(&sorted, column, "count {count}, column {j}");
            }
        }
        assert_eq!(sorting_network(8).len(), 19);
    }

    #[test]
    fn lanes_sum_in_the_specified_order() {
        let values: Vec<f64> = (0..1003).map(|i| (i as f64 * 0.37).sin() * 1e3).collect();
        let mut lanes = [0.0f64; LANES];
        for (i, x) in values.iter().enumerate() {
            lanes[i % LANES] += x * x;
        }
        let expected = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
            + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
        let array = Array::floats(values.clone());
        assert_eq!(
            squared_distance(&[&array], None).to_bits(),
            expected.to_bits()
        );
        let narrow: Vec<f32> = values.iter().map(|&x| x as f32).collect();
        let wide: Vec<f64> = narrow.iter().map(|&x| f64::from(x)).collect();
        let narrow = Array::new(vec![1003], ArrayData::F32(narrow.into()));
        let wide = Array::floats(wide);
        assert_eq!(
            squared_distance(&[&narrow], None),
            squared_distance(&[&wide], None)
        );
    }
}
