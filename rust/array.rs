//! N-D arrays of numbers: the one array type that the hash writes and the average reads.

use std::borrow::Cow;

/// An N-D array of numbers of one dtype, row-major, borrowed or owned.
#[derive(Clone, Debug)]
pub struct Array<'a> {
    shape: Vec<usize>,
    data: ArrayData<'a>,
}

/// The row-major values of an [`Array`].
#[derive(Clone, Debug)]
pub enum ArrayData<'a> {
    F64(Cow<'a, [f64]>),
    /// Hashed and averaged as the doubles of the same values.
    F32(Cow<'a, [f32]>),
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
            ArrayData::I64(d) => d.len(),
            ArrayData::U64(d) => d.len(),
        }
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
    #[should_panic(expected = "data length must match shape")]
    fn data_that_does_not_fill_the_shape_is_a_bug() {
        Array::new(vec![2, 2], ArrayData::F64(vec![1.0].into()));
    }
}
