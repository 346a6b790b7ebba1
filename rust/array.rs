//! N-D arrays of numbers: the one array type that the hash writes and the average reads.

use std::borrow::Cow;
use std::ops::Range;

/// An IEEE 754 half-precision number (NumPy's `float16`), held as its bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[repr(transparent)]
pub struct F16(pub u16);

impl F16 {
    /// The value as a double: exact (every half is a double), NaN payloads kept as NumPy's
    /// cast keeps them.
    #[inline(always)]
    pub fn to_f64(self) -> f64 {
        let sign = u64::from(self.0 >> 15) << 63;
        let exponent = (self.0 >> 10) & 0x1f;
        let mantissa = u64::from(self.0 & 0x3ff);
        match exponent {
            // Subnormal (or zero): mantissa * 2^-24, exact; the sign kept for -0.0.
            0 => f64::from_bits(sign | (mantissa as f64 * 2f64.powi(-24)).to_bits()),
            0x1f => f64::from_bits(sign | 0x7ff0_0000_0000_0000 | mantissa << 42),
            _ => f64::from_bits(sign | (u64::from(exponent) + 1008) << 52 | mantissa << 42),
        }
    }

    /// The half nearest to `x`, ties to even (one rounding, as NumPy's `astype(float16)`);
    /// beyond the largest half (65504) by half a step or more, an infinity. A NaN stays a NaN
    /// with the top bits of its payload, as NumPy keeps them.
    #[inline]
    pub fn from_f64(x: f64) -> F16 {
        let bits = x.to_bits();
        let sign = ((bits >> 48) as u16) & 0x8000;
        if x.is_nan() {
            let payload = ((bits >> 42) & 0x3ff) as u16;
            return F16(sign | 0x7c00 | payload.max(1));
        }
        let magnitude = x.abs();
        if magnitude >= 65520.0 {
            return F16(sign | 0x7c00);
        }
        // The step between halves near `x`: 2^(e - 10) for a normal half of exponent e, and
        // 2^-24 (the subnormals') below 2^-14. The scaling by a power of two is exact.
        let exponent = (((bits >> 52) & 0x7ff) as i32 - 1023).max(-14);
        let steps = (magnitude * f64::from_bits(((1023 + 10 - exponent) as u64) << 52))
            .round_ties_even() as u16;
        // Halves follow their bits' order, exponent field then mantissa: a carry out of the
        // mantissa (2^11 steps) is the next binade's first half.
        F16(sign | ((((exponent + 14) as u16) << 10) + steps))
    }
}

/// An N-D array of numbers of one dtype, row-major, borrowed or owned.
#[derive(Clone, Debug)]
pub struct Array<'a> {
    shape: Vec<usize>,
    data: ArrayData<'a>,
}

/// The row-major values of an [`Array`].
#[derive(Clone, Debug, PartialEq)]
pub enum ArrayData<'a> {
    F64(Cow<'a, [f64]>),
    /// Hashed and averaged as the doubles of the same values.
    F32(Cow<'a, [f32]>),
    /// Hashed and averaged as the doubles of the same values.
    F16(Cow<'a, [F16]>),
    /// Hashed as ints; averaged as the nearest doubles (ties to even, as NumPy casts them).
    I64(Cow<'a, [i64]>),
    /// Hashed as ints; averaged as the nearest doubles (ties to even, as NumPy casts them).
    U64(Cow<'a, [u64]>),
}

impl ArrayData<'_> {
    /// How many values there are.
    pub fn len(&self) -> usize {
        match self {
            ArrayData::F64(d) => d.len(),
            ArrayData::F32(d) => d.len(),
            ArrayData::F16(d) => d.len(),
            ArrayData::I64(d) => d.len(),
            ArrayData::U64(d) => d.len(),
        }
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An element type of [`ArrayData`], read as the double NumPy's `astype(float64)` gives.
pub trait Element: Copy {
    /// The value as a double.
    fn widen(self) -> f64;
    /// The values of `data`, which holds this type.
    fn slice<'a>(data: &'a ArrayData<'_>) -> &'a [Self];
}

macro_rules! element {
    ($t:ty, $variant:ident, $widen:expr) => {
        impl Element for $t {
            #[inline(always)]
            fn widen(self) -> f64 {
                $widen(self)
            }

            #[inline(always)]
            fn slice<'a>(data: &'a ArrayData<'_>) -> &'a [Self] {
                match data {
                    ArrayData::$variant(values) => values,
                    _ => unreachable!("the caller matched the element type of the data"),
                }
            }
        }
    };
}

// f32 and f16 widen exactly; i64 and u64 round to the nearest double, ties to even, as
// NumPy's cast does (that is what Rust's `as` does).
element!(f64, F64, |x| x);
element!(f32, F32, f64::from);
element!(F16, F16, F16::to_f64);
element!(i64, I64, |x| x as f64);
element!(u64, U64, |x| x as f64);

impl ArrayData<'_> {
    /// Values `range` as doubles ([`Element::widen`]): the values themselves for float64, else
    /// widened into `buffer` (at least `range.len()` long).
    #[inline(always)]
    pub fn doubles<'b>(&'b self, range: Range<usize>, buffer: &'b mut [f64]) -> &'b [f64] {
        fn widen<T: Element>(values: &[T], out: &mut [f64]) {
            for (slot, &x) in out.iter_mut().zip(values) {
                *slot = x.widen();
            }
        }
        let out = &mut buffer[..range.len()];
        match self {
            ArrayData::F64(values) => return &values[range],
            ArrayData::F32(values) => widen(&values[range], out),
            ArrayData::F16(values) => widen(&values[range], out),
            ArrayData::I64(values) => widen(&values[range], out),
            ArrayData::U64(values) => widen(&values[range], out),
        }
        out
    }
}

impl<'a> Array<'a> {
    /// An array of the given shape (empty for 0-D) over row-major `data`.
    ///
    /// # Panics
    /// If `data` does not hold exactly as many values as `shape`.
    pub fn new(shape: Vec<usize>, data: ArrayData<'a>) -> Self {
        assert_eq!(
            data.len(),
            shape.iter().product::<usize>(),
            "data length must match shape {shape:?}"
        );
        Array { shape, data }
    }

    /// A 1-D array of doubles.
    pub fn floats(values: impl Into<Cow<'a, [f64]>>) -> Self {
        let data = values.into();
        Array {
            shape: vec![data.len()],
            data: ArrayData::F64(data),
        }
    }

    /// The array's shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The array's row-major values.
    pub fn data(&self) -> &ArrayData<'a> {
        &self.data
    }

    /// How many values the array holds.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the array holds no values.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// An empty 1-D array (what an empty list is).
impl Default for Array<'_> {
    fn default() -> Self {
        Array::floats(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_is_the_product_of_the_shape() {
        let array = Array::new(vec![2, 3], ArrayData::I64(vec![0; 6].into()));
        assert_eq!((array.shape(), array.len()), (&[2, 3][..], 6));
        let scalar = Array::new(vec![], ArrayData::U64(vec![7].into()));
        assert_eq!((scalar.len(), scalar.is_empty()), (1, false));
        assert!(Array::new(vec![2, 0], ArrayData::F32(Vec::new().into())).is_empty());
        assert_eq!(Array::default().shape(), [0]);
    }

    #[test]
    fn halves_widen_exactly_and_narrow_to_nearest_even() {
        let cases: [(u16, f64); 10] = [
            (0x0000, 0.0),
            (0x8000, -0.0),
            (0x0001, 2f64.powi(-24)),
            (0x03ff, 1023.0 * 2f64.powi(-24)),
            (0x0400, 2f64.powi(-14)),
            (0x3c00, 1.0),
            (0x3c01, 1.0 + 2f64.powi(-10)),
            (0xc000, -2.0),
            (0x7bff, 65504.0),
            (0x7c00, f64::INFINITY),
        ];
        for (bits, value) in cases {
            assert_eq!(F16(bits).to_f64().to_bits(), value.to_bits(), "{bits:#06x}");
            assert_eq!(F16::from_f64(value), F16(bits), "{value}");
        }
        let half_step = 2f64.powi(-11);
        // Ties go to the even mantissa; anything above a tie rounds up (one rounding: a
        // detour through float32 would round 1 + 2^-11 + 2^-40 down to the tie, then to 1).
        assert_eq!(F16::from_f64(1.0 + half_step), F16(0x3c00));
        assert_eq!(F16::from_f64(1.0 + 3.0 * half_step), F16(0x3c02));
        assert_eq!(F16::from_f64(1.0 + half_step + 2f64.powi(-40)), F16(0x3c01));
        // Rounding up across a binade, into the normals and to infinity.
        assert_eq!(F16::from_f64(2.0 - 2f64.powi(-12)), F16(0x4000));
        assert_eq!(F16::from_f64(1023.5 * 2f64.powi(-24)), F16(0x0400));
        assert_eq!(F16::from_f64(65519.99), F16(0x7bff));
        assert_eq!(F16::from_f64(-65520.0), F16(0xfc00));
        assert_eq!(F16::from_f64(-1e300), F16(0xfc00));
        // Below half the smallest subnormal: a signed zero; the tie at 2^-25 goes to zero.
        assert_eq!(F16::from_f64(-1e-300), F16(0x8000));
        assert_eq!(F16::from_f64(2f64.powi(-25)), F16(0x0000));
        assert_eq!(F16::from_f64(2f64.powi(-25) * 1.5), F16(0x0001));
        // NaN stays NaN, its payload's top bits kept as NumPy keeps them.
        assert!(F16(0x7e00).to_f64().is_nan());
        assert_eq!(F16::from_f64(F16(0xfe01).to_f64()), F16(0xfe01));
        assert_eq!(
            F16::from_f64(f64::from_bits(0x7ff0_0000_0000_0001)),
            F16(0x7c01)
        );
    }

    #[test]
    #[should_panic(expected = "data length must match shape")]
    fn data_that_does_not_fill_the_shape_is_a_bug() {
        Array::new(vec![2, 2], ArrayData::F64(vec![1.0].into()));
    }
}
