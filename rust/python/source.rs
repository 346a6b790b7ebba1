//! Python gradient values as core values: NumPy arrays read in place through [`ArrayView`],
//! everything else converted into owned core values.

use std::borrow::Cow;
use std::fmt;
use std::mem;

use numpy::{
    Element, PyArrayDescr, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyUntypedArray,
    PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyFloat, PyInt, PyString};

use super::input::{classify, gradient_entries, type_name, Kind, Site};
use super::lists::{int_value, plain_sequence, Rectangle};
use crate::array::{Array, ArrayData, F16};
use crate::hash::Value;

/// A NumPy array as one of the core's element types, referenced for as long as the view lives:
/// read in place when it is float64, float32, float16, int64 or uint64 (native byte order,
/// aligned), else a copy converted by NumPy (smaller ints widen exactly; other byte orders and
/// unaligned data keep their type: float32 stays float32, float16 float16; long double is
/// rounded to float64). The wire digest covers the type, so the fallback reads arrays alike.
///
/// The arrays are read without rust-numpy's borrow tracking (a global registry whose updates
/// cost about half of reading an argument): this module never borrows an argument mutably, and
/// the tracking never stopped Python code in another thread from writing to an array anyway.
pub(super) enum ArrayView<'py> {
    F64(Bound<'py, PyArrayDyn<f64>>),
    F32(Bound<'py, PyArrayDyn<f32>>),
    F16(Bound<'py, PyArrayDyn<F16>>),
    I64(Bound<'py, PyArrayDyn<i64>>),
    U64(Bound<'py, PyArrayDyn<u64>>),
}

impl<'py> ArrayView<'py> {
    /// View an array of a numeric dtype (checked by [`classify`]).
    fn of(array: &Bound<'py, PyUntypedArray>) -> PyResult<Self> {
        if viewable_as::<f64>(array) {
            return Ok(ArrayView::F64(array_as(array)?));
        }
        if viewable_as::<f32>(array) {
            return Ok(ArrayView::F32(array_as(array)?));
        }
        let dtype = array.dtype();
        Ok(match (dtype.kind(), dtype.itemsize()) {
            (b'i', _) => ArrayView::I64(array_as(array)?),
            (b'u', _) => ArrayView::U64(array_as(array)?),
            (_, 4) => ArrayView::F32(array_as(array)?),
            (_, 2) => ArrayView::F16(array_as(array)?),
            _ => ArrayView::F64(array_as(array)?),
        })
    }

    /// The core array: borrowed when the NumPy array is C-contiguous, else copied row-major.
    fn array(&self) -> Array<'_> {
        match self {
            ArrayView::F64(a) => Array::new(a.shape().to_vec(), ArrayData::F64(row_major(a))),
            ArrayView::F32(a) => Array::new(a.shape().to_vec(), ArrayData::F32(row_major(a))),
            ArrayView::F16(a) => Array::new(a.shape().to_vec(), ArrayData::F16(row_major(a))),
            ArrayView::I64(a) => Array::new(a.shape().to_vec(), ArrayData::I64(row_major(a))),
            ArrayView::U64(a) => Array::new(a.shape().to_vec(), ArrayData::U64(row_major(a))),
        }
    }
}

// SAFETY: `F16` is `repr(transparent)` over the `u16` bits of an IEEE half, the layout of
// NumPy's float16 (`NPY_HALF`), and holds no Python objects.
unsafe impl Element for F16 {
    const IS_COPY: bool = true;

    fn get_dtype(py: Python<'_>) -> Bound<'_, PyArrayDescr> {
        static FLOAT16: PyOnceLock<Py<PyArrayDescr>> = PyOnceLock::new();
        FLOAT16
            .get_or_init(py, || {
                PyArrayDescr::new(py, "float16")
                    .expect("NumPy has float16")
                    .unbind()
            })
            .bind(py)
            .clone()
    }

    fn clone_ref(&self, _py: Python<'_>) -> Self {
        *self
    }
}

/// Whether the array can be read in place as `T`: its dtype is `T` (native byte order) and its
/// data is aligned.
fn viewable_as<T: Element>(array: &Bound<'_, PyUntypedArray>) -> bool {
    array.cast::<PyArrayDyn<T>>().is_ok() && array.is_aligned()
}

/// The array as `T`: itself when [`viewable_as`], else a copy converted by NumPy.
fn array_as<'py, T: Element>(
    array: &Bound<'py, PyUntypedArray>,
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    Ok(if viewable_as::<T>(array) {
        array.cast::<PyArrayDyn<T>>()?.clone()
    } else {
        array
            .call_method1("astype", (numpy::dtype::<T>(array.py()),))?
            .cast_into::<PyArrayDyn<T>>()?
    })
}

/// The array's values in row-major order: borrowed in place when C-contiguous, else copied.
fn row_major<'a, T: Element + Copy>(array: &'a Bound<'_, PyArrayDyn<T>>) -> Cow<'a, [T]> {
    // SAFETY: the array is alive for `'a` (the view holds a reference to it) and this module
    // never creates a mutable borrow of it; see [`ArrayView`] for writes from Python.
    unsafe {
        match array.as_slice() {
            Ok(slice) if array.is_c_contiguous() => Cow::Borrowed(slice),
            _ => Cow::Owned(array.as_array().iter().copied().collect()),
        }
    }
}

/// A gradient value ready for the core: an owned core value (`T`), or a NumPy array that the
/// core value will borrow.
pub(super) enum Source<'py, T> {
    Owned(T),
    View(ArrayView<'py>),
}

/// A source's core value, taken once: an owned value is moved out, a NumPy array borrowed.
pub(super) trait Take {
    /// The core value, borrowing the source.
    type Core<'s>
    where
        Self: 's;

    fn take(&mut self) -> Self::Core<'_>;
}

/// The value to hash.
impl Take for Source<'_, Value<'static>> {
    type Core<'s>
        = Value<'s>
    where
        Self: 's;

    fn take(&mut self) -> Value<'_> {
        match self {
            Source::Owned(value) => mem::replace(value, Value::List(Vec::new())),
            Source::View(view) => Value::Array(Box::new(view.array())),
        }
    }
}

/// The array to average, scan or digest for the wire.
impl Take for Source<'_, Array<'static>> {
    type Core<'s>
        = Array<'s>
    where
        Self: 's;

    fn take(&mut self) -> Array<'_> {
        match self {
            Source::Owned(array) => mem::take(array),
            Source::View(view) => view.array(),
        }
    }
}

/// The `(key, source)` pairs of a gradient map, each value checked and converted by `convert`.
pub(super) fn gradient_sources<'py, T>(
    gradients: &Bound<'py, PyAny>,
    label: Option<&str>,
    convert: fn(&Site<'_, 'py>, &Bound<'py, PyAny>) -> PyResult<Source<'py, T>>,
) -> PyResult<Vec<(Bound<'py, PyString>, Source<'py, T>)>> {
    let mut sources = Vec::new();
    for entry in gradient_entries(gradients, label)? {
        let (key, value) = entry?;
        let site = Site {
            key: key.as_any(),
            label,
        };
        let source = convert(&site, &value)?;
        sources.push((key, source));
    }
    Ok(sources)
}

/// A gradient value to hash, as `plain(g)[key]` holds it.
pub(super) fn hash_source<'py>(
    site: &Site<'_, 'py>,
    value: &Bound<'py, PyAny>,
) -> PyResult<Source<'py, Value<'static>>> {
    let plain = match classify(site, value)? {
        Kind::Array(array) => {
            let dtype = array.dtype();
            // long double: `.tolist()` keeps NumPy scalars, which json.dumps rejects.
            if dtype.kind() == b'f' && dtype.itemsize() > 8 {
                return Err(not_serialisable(site, format_args!("array dtype {dtype}")));
            }
            return Ok(Source::View(ArrayView::of(&array)?));
        }
        // `.tolist()` gives a Python float or int (or, for long double, a NumPy scalar that
        // json cannot serialise).
        Kind::NumpyScalar => {
            let plain = value.call_method0("tolist")?;
            if let Ok(float) = plain.cast::<PyFloat>() {
                Value::Float(float.value())
            } else if let Ok(int) = plain.cast::<PyInt>() {
                int_value(int)?
            } else {
                let what = format!("object of type {}", type_name(&plain));
                return Err(not_serialisable(site, what));
            }
        }
        Kind::Sequence => plain_sequence(site, value)?,
        Kind::Float(x) => Value::Float(x),
        Kind::Int(int) => int_value(&int)?,
    };
    Ok(Source::Owned(plain))
}

fn not_serialisable(site: &Site<'_, '_>, what: impl fmt::Display) -> PyErr {
    site.type_error(format_args!("{what} is not JSON serializable"))
}

/// A gradient value to average, as `np.asarray(value, dtype=np.float64)` reads it.
pub(super) fn average_source<'py>(
    site: &Site<'_, 'py>,
    value: &Bound<'py, PyAny>,
) -> PyResult<Source<'py, Array<'static>>> {
    let scalar = |x: f64| Array::new(Vec::new(), ArrayData::F64(vec![x].into()));
    Ok(Source::Owned(match classify(site, value)? {
        Kind::Array(array) => return Ok(Source::View(ArrayView::of(&array)?)),
        Kind::NumpyScalar | Kind::Int(_) => scalar(value.extract::<f64>()?),
        Kind::Float(x) => scalar(x),
        Kind::Sequence => {
            let (shape, values) = Rectangle::of(site, value)?;
            Array::new(shape, ArrayData::F64(values.into()))
        }
    }))
}
