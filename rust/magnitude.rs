//! The largest magnitude in each of many arrays, in one threaded pass: the native half of the
//! screening check that every update's values are finite and bounded.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::array::{Array, ArrayData, F16};
use crate::{parallel, simd};

/// The bits of `+inf`; the magnitude bits of every NaN are larger.
const INFINITY_BITS: u64 = 0x7FF0_0000_0000_0000;

/// Values handed to a thread come in multiples of this many.
const ALIGN: usize = 64;

/// For each array, `max |x|` over its values read as doubles: NaN when it holds a NaN (even
/// beside an infinity), `inf` when it holds an infinity, `0.0` when it is empty.
///
/// The magnitude of a double is its bit pattern without the sign bit, and magnitudes order as
/// those patterns do as integers (every NaN above `inf`), so the kernel is an integer maximum:
/// exact, and as fast as reading the values.
pub fn max_abs(arrays: &[&Array<'_>]) -> Vec<f64> {
    let total: usize = arrays.iter().map(|a| a.len()).sum();
    let threads = parallel::threads_for(total);
    let maxima: Vec<AtomicU64> = arrays.iter().map(|_| AtomicU64::new(0)).collect();
    let mut items = Vec::new();
    for (index, array) in arrays.iter().enumerate() {
        for range in parallel::pieces(array.len(), 1, total, threads, ALIGN) {
            items.push((index, range));
        }
    }
    parallel::for_each(items, threads, |(index, range)| {
        let bits = simd::dispatch(
            #[inline(always)]
            || magnitude_bits(arrays[index].data(), range),
        );
        maxima[index].fetch_max(bits, Ordering::Relaxed);
    });
    maxima
        .into_iter()
        .map(|bits| match bits.into_inner() {
            bits if bits > INFINITY_BITS => f64::NAN,
            bits => f64::from_bits(bits),
        })
        .collect()
}

/// The largest magnitude bits (see [`max_abs`]) of `data[range]`, read as doubles.
#[inline(always)]
fn magnitude_bits(data: &ArrayData<'_>, range: std::ops::Range<usize>) -> u64 {
    match data {
        ArrayData::F64(values) => largest(&values[range], |x| x.to_bits() & !(1 << 63)),
        ArrayData::F32(values) => {
            // The same order on float32 bits; widened once at the end (NaN stays NaN).
            let bits = largest(&values[range], |x| u64::from(x.to_bits() & !(1 << 31)));
            f64::from(f32::from_bits(bits as u32)).to_bits() & !(1 << 63)
        }
        ArrayData::F16(values) => {
            let bits = largest(&values[range], |x| u64::from(x.0 & 0x7fff));
            F16(bits as u16).to_f64().to_bits()
        }
        ArrayData::I64(values) => largest(&values[range], |x| (x as f64).abs().to_bits()),
        ArrayData::U64(values) => largest(&values[range], |x| (x as f64).to_bits()),
    }
}

/// The largest `key(x)` over `values` (0 when empty); the keys are below `2^63`.
#[inline(always)]
fn largest<T: Copy>(values: &[T], key: impl Fn(T) -> u64) -> u64 {
    // Signed compares (AVX2 has them for 64-bit lanes) order the keys as unsigned ones.
    values.iter().fold(0i64, |best, &x| best.max(key(x) as i64)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn floats(values: Vec<f64>) -> Array<'static> {
        Array::floats(values)
    }

    #[test]
    fn largest_magnitude_of_each_array_of_every_type() {
        let arrays = [
            floats(vec![0.5, -3.25, 2.0]),
            floats(vec![-0.0]),
            floats(vec![]),
            Array::new(vec![3], ArrayData::F32(vec![1.5f32, -7.0, 0.1].into())),
            Array::new(
                vec![2],
                ArrayData::F16(vec![F16(0xc500), F16(0x0001)].into()),
            ),
            Array::new(vec![2], ArrayData::I64(vec![i64::MIN, 5].into())),
            Array::new(vec![2], ArrayData::U64(vec![3, u64::MAX].into())),
            floats(vec![f64::MIN_POSITIVE / 4.0, -f64::MAX]),
        ];
        let refs: Vec<&Array<'_>> = arrays.iter().collect();
        let result = max_abs(&refs);
        assert_eq!(
            result,
            [
                3.25,
                0.0,
                0.0,
                7.0,
                5.0,
                2f64.powi(63),
                u64::MAX as f64,
                f64::MAX
            ]
        );
        assert_eq!(result[1].to_bits(), 0, "-0.0 has magnitude +0.0");
    }

    #[test]
    fn nan_wins_over_infinity_and_infinity_over_finite_values() {
        let arrays = [
            floats(vec![1.0, f64::NEG_INFINITY, 2.0]),
            floats(vec![f64::INFINITY, f64::NAN, 1.0]),
            floats(vec![-f64::NAN]),
            Array::new(
                vec![2],
                ArrayData::F32(vec![f32::NAN, f32::INFINITY].into()),
            ),
            Array::new(vec![1], ArrayData::F32(vec![f32::NEG_INFINITY].into())),
            Array::new(
                vec![2],
                ArrayData::F16(vec![F16(0x7e00), F16(0xfc00)].into()),
            ),
            Array::new(
                vec![2],
                ArrayData::F16(vec![F16(0x3c00), F16(0xfc00)].into()),
            ),
        ];
        let refs: Vec<&Array<'_>> = arrays.iter().collect();
        let result = max_abs(&refs);
        assert_eq!(result[0], f64::INFINITY);
        assert!(result[1].is_nan() && result[2].is_nan() && result[3].is_nan());
        assert_eq!(result[4], f64::INFINITY);
        assert!(result[5].is_nan());
        assert_eq!(result[6], f64::INFINITY);
    }

    #[test]
    fn threaded_pieces_agree_with_a_plain_scan() {
        // Large enough to be split across threads; the extreme value in the last piece.
        let mut values: Vec<f64> = (0..3 << 20)
            .map(|i| ((i % 1001) as f64 - 500.0) * 1e-3)
            .collect();
        let last = values.len() - 3;
        values[last] = -1e300;
        let expected = values.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let small = floats(vec![0.25; 100]);
        let big = Array::floats(&values[..]);
        assert_eq!(max_abs(&[&big, &small]), [1e300, 0.25]);
        assert_eq!(max_abs(&[&big])[0], expected);
    }
}
