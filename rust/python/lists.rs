//! Lists and tuples of numbers: as the hash writes them, and as rectangles to average.

use pyo3::exceptions::{PyMemoryError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::list::BoundListIterator;
use pyo3::types::tuple::BoundTupleIterator;
use pyo3::types::{PyBool, PyFloat, PyInt, PyList, PyTuple};

use super::input::Site;
use crate::error::shape_repr;
use crate::hash::Value;

pub(super) fn is_sequence(value: &Bound<'_, PyAny>) -> bool {
    value.is_instance_of::<PyList>() || value.is_instance_of::<PyTuple>()
}

/// The items of a list or tuple.
enum Items<'py> {
    List(BoundListIterator<'py>),
    Tuple(BoundTupleIterator<'py>),
}

impl<'py> Iterator for Items<'py> {
    type Item = Bound<'py, PyAny>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Items::List(items) => items.next(),
            Items::Tuple(items) => items.next(),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        match self {
            Items::List(items) => items.size_hint(),
            Items::Tuple(items) => items.size_hint(),
        }
    }
}

impl ExactSizeIterator for Items<'_> {}

/// Iterate over a list or tuple (or fail with the cast error for anything else).
fn sequence_items<'py>(seq: &Bound<'py, PyAny>) -> PyResult<Items<'py>> {
    match seq.cast::<PyList>() {
        Ok(list) => Ok(Items::List(list.clone().into_iter())),
        Err(_) => Ok(Items::Tuple(seq.cast::<PyTuple>()?.clone().into_iter())),
    }
}

/// One level of list nesting under Python's recursion limit: past it, a `RecursionError` (as
/// the reference and `json.dumps` raise) instead of overflowing the native stack.
struct Nesting;

impl Nesting {
    fn enter(py: Python<'_>) -> PyResult<Self> {
        // SAFETY: the GIL is held (`py` proves it); `Drop` leaves the recursive call.
        if unsafe { pyo3::ffi::Py_EnterRecursiveCall(c" while reading a nested list".as_ptr()) }
            != 0
        {
            return Err(PyErr::fetch(py));
        }
        Ok(Nesting)
    }
}

impl Drop for Nesting {
    fn drop(&mut self) {
        // SAFETY: paired with the successful `Py_EnterRecursiveCall` in `enter`, GIL held.
        unsafe { pyo3::ffi::Py_LeaveRecursiveCall() }
    }
}

/// A Python int: in 64 bits when it fits, else its `int.__repr__` digits.
pub(super) fn int_value(int: &Bound<'_, PyInt>) -> PyResult<Value<'static>> {
    match int.extract::<i64>() {
        Ok(small) => Ok(Value::Int(small)),
        Err(_) => {
            let digits = int
                .py()
                .get_type::<PyInt>()
                .getattr("__repr__")?
                .call1((int,))?;
            Ok(Value::BigInt(digits.extract()?))
        }
    }
}

/// A (nested, possibly ragged) list or tuple of numbers.
pub(super) fn plain_sequence(
    site: &Site<'_, '_>,
    seq: &Bound<'_, PyAny>,
) -> PyResult<Value<'static>> {
    let _nesting = Nesting::enter(seq.py())?;
    let items = sequence_items(seq)?;
    let mut floats = Vec::with_capacity(items.len());
    let mut mixed: Option<Vec<Value<'static>>> = None;
    for item in items {
        if let Ok(float) = item.cast::<PyFloat>() {
            match &mut mixed {
                None => floats.push(float.value()),
                Some(values) => values.push(Value::Float(float.value())),
            }
            continue;
        }
        let value = if is_sequence(&item) {
            plain_sequence(site, &item)?
        } else if item.is_instance_of::<PyBool>() {
            return Err(site.not_a_number(&item));
        } else if let Ok(int) = item.cast::<PyInt>() {
            int_value(int)?
        } else {
            return Err(site.not_a_number(&item));
        };
        mixed
            .get_or_insert_with(|| floats.drain(..).map(Value::Float).collect())
            .push(value);
    }
    Ok(match mixed {
        None => Value::floats(floats),
        Some(values) => Value::List(values),
    })
}

/// Flattens a nested list into a row-major array, as `np.asarray(..., dtype=float64)` does.
pub(super) struct Rectangle {
    shape: Vec<usize>,
    values: Vec<f64>,
    ragged: bool,
    /// The first int too large for a float; reported after type and shape errors.
    overflow: Option<PyErr>,
}

impl Rectangle {
    /// Shape and row-major values of a rectangular nested list or tuple of numbers.
    ///
    /// Type errors come first (as the reference checks types before NumPy sees the list),
    /// then a ragged shape (`ValueError`), then an int too large for a float.
    pub(super) fn of(
        site: &Site<'_, '_>,
        seq: &Bound<'_, PyAny>,
    ) -> PyResult<(Vec<usize>, Vec<f64>)> {
        let mut rectangle = Rectangle {
            shape: first_path_shape(seq)?,
            values: Vec::new(),
            ragged: false,
            overflow: None,
        };
        // Lists may repeat one row object, so the shape can promise more than memory holds.
        let len = rectangle
            .shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d));
        if len.is_none_or(|len| rectangle.values.try_reserve_exact(len).is_err()) {
            return Err(PyMemoryError::new_err(format!(
                "{site}: a nested list of shape {} does not fit in memory",
                shape_repr(&rectangle.shape)
            )));
        }
        rectangle.walk(site, seq, 0)?;
        if rectangle.ragged {
            return Err(PyValueError::new_err(format!(
                "{site}: not a rectangular array (the nested lists have different lengths)"
            )));
        }
        if let Some(error) = rectangle.overflow {
            return Err(error);
        }
        Ok((rectangle.shape, rectangle.values))
    }

    fn walk(&mut self, site: &Site<'_, '_>, seq: &Bound<'_, PyAny>, depth: usize) -> PyResult<()> {
        let _nesting = Nesting::enter(seq.py())?;
        let items = sequence_items(seq)?;
        self.ragged |= self.shape.get(depth) != Some(&items.len());
        let leaves = depth + 1 == self.shape.len();
        for item in items {
            if is_sequence(&item) {
                if leaves {
                    self.ragged = true;
                    check_numbers(site, &item)?;
                } else {
                    self.walk(site, &item, depth + 1)?;
                }
            } else {
                let x = self.number(site, &item)?;
                if leaves {
                    self.values.push(x);
                } else {
                    self.ragged = true;
                }
            }
        }
        Ok(())
    }

    fn number(&mut self, site: &Site<'_, '_>, item: &Bound<'_, PyAny>) -> PyResult<f64> {
        if let Ok(float) = item.cast::<PyFloat>() {
            return Ok(float.value());
        }
        if item.is_instance_of::<PyBool>() || !item.is_instance_of::<PyInt>() {
            return Err(site.not_a_number(item));
        }
        Ok(item.extract::<f64>().unwrap_or_else(|error| {
            self.overflow.get_or_insert(error);
            f64::NAN
        }))
    }
}

/// The shape NumPy infers from the first element at each depth.
fn first_path_shape(seq: &Bound<'_, PyAny>) -> PyResult<Vec<usize>> {
    let mut shape = Vec::new();
    let mut current = seq.clone();
    loop {
        let items = sequence_items(&current)?;
        shape.push(items.len());
        match items.take(1).next() {
            Some(first) if is_sequence(&first) => current = first,
            _ => return Ok(shape),
        }
    }
}

/// Check that a nested list holds only numbers (no bools).
fn check_numbers(site: &Site<'_, '_>, seq: &Bound<'_, PyAny>) -> PyResult<()> {
    let _nesting = Nesting::enter(seq.py())?;
    for item in sequence_items(seq)? {
        if is_sequence(&item) {
            check_numbers(site, &item)?;
        } else if item.is_instance_of::<PyBool>()
            || !(item.is_instance_of::<PyFloat>() || item.is_instance_of::<PyInt>())
        {
            return Err(site.not_a_number(&item));
        }
    }
    Ok(())
}
