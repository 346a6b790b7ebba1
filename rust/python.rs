//! The PyO3 module `aumai_fedtrain._native`: a thin layer over the core.
//!
//! With the GIL held, Python values are checked exactly as the reference
//! (`aumai_fedtrain._fallback`) checks them and turned into core values: NumPy float64 and
//! float32 arrays are borrowed in place, other numeric arrays are converted by NumPy, lists are
//! copied into Rust vectors. The GIL is then released while the core hashes or averages.

use std::borrow::Cow;
use std::fmt;
use std::mem;

use numpy::ndarray::{ArrayD, IxDyn};
use numpy::{
    Element, PyArray, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn,
    PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyMemoryError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::list::BoundListIterator;
use pyo3::types::tuple::BoundTupleIterator;
use pyo3::types::{
    PyBool, PyBytes, PyDict, PyFloat, PyInt, PyList, PyMapping, PyString, PyTuple, PyType,
};

use crate::average::{self, NodeUpdate, Tensor, TensorData};
use crate::error::{shape_repr, AverageError};
use crate::hash::{self, NumberData, Numbers, Value};
use crate::key::Key;

/// Native hot paths of aumai-fedtrain (same contract as `aumai_fedtrain._fallback`).
#[pymodule]
mod _native {
    #[pymodule_export]
    use super::{canonical_hash, weighted_average};
}

/// SHA-256 hex digest of the canonical JSON serialisation of ``gradients``.
#[pyfunction]
fn canonical_hash(py: Python<'_>, gradients: &Bound<'_, PyAny>) -> PyResult<String> {
    let mut sources = Vec::new();
    for entry in gradient_entries(gradients, None)? {
        let (key, value) = entry?;
        let site = Site {
            key: key.as_any(),
            label: None,
        };
        let source = hash_source(&site, &value)?;
        sources.push((key, source));
    }
    let mut entries = Vec::with_capacity(sources.len());
    for (key, source) in &mut sources {
        entries.push((key_of(key)?, source.take()));
    }
    Ok(py.detach(|| hash::canonical_hash(entries)))
}

/// Per-key weighted mean of gradient maps, in float64 (see ``_fallback.weighted_average``).
#[pyfunction]
#[pyo3(signature = (updates, weights, labels = None))]
fn weighted_average<'py>(
    py: Python<'py>,
    updates: &Bound<'py, PyAny>,
    weights: &Bound<'py, PyAny>,
    labels: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let count = updates.len()?;
    // The reference rejects an empty list before it looks at the weights.
    if count == 0 {
        average::check_weights(&[], 0).map_err(|error| value_error(py, &error))?;
    }
    let weights = weights
        .try_iter()?
        .map(|w| python_float(&w?))
        .collect::<PyResult<Vec<f64>>>()?;
    average::check_weights(&weights, count).map_err(|error| value_error(py, &error))?;
    let labels: Vec<String> = match labels {
        None => (0..count).map(|i| format!("update #{i}")).collect(),
        Some(labels) => labels
            .try_iter()?
            .map(|label| Ok(label?.str()?.to_string_lossy().into_owned()))
            .collect::<PyResult<_>>()?,
    };
    if labels.len() != count {
        return Err(PyValueError::new_err(format!(
            "got {} labels for {count} updates",
            labels.len()
        )));
    }

    let mut nodes = Vec::with_capacity(count);
    for (update, label) in updates.try_iter()?.zip(&labels) {
        nodes.push(node_sources(&update?, label)?);
    }
    let mut node_updates = Vec::with_capacity(count);
    for (entries, label) in nodes.iter_mut().zip(labels) {
        let mut converted = Vec::with_capacity(entries.len());
        for (key, source) in entries.iter_mut() {
            converted.push((key_of(key)?, source.take()));
        }
        node_updates.push(NodeUpdate {
            label,
            entries: converted,
        });
    }
    let averages = py
        .detach(|| average::weighted_average(&node_updates, &weights))
        .map_err(|error| value_error(py, &error))?;

    let result = PyDict::new(py);
    for averaged in averages {
        let key = &nodes[averaged.node][averaged.entry].0;
        let values = ArrayD::from_shape_vec(IxDyn(&averaged.shape), averaged.values)
            .expect("the core returns as many values as the shape holds");
        result.set_item(key, PyArray::from_owned_array(py, values))?;
    }
    Ok(result)
}

/// The `(key, value)` pairs of a gradient map, each key checked to be a `str` as it comes.
///
/// Errors name the update (`label`) when there is one.
fn gradient_entries<'py>(
    gradients: &Bound<'py, PyAny>,
    label: Option<&str>,
) -> PyResult<impl Iterator<Item = PyResult<(Bound<'py, PyString>, Bound<'py, PyAny>)>> + 'py> {
    let prefix = label.map(|label| format!("{label}: ")).unwrap_or_default();
    // Exactly a dict: its items directly (a subclass may override `items`).
    let items = if let Ok(dict) = gradients.cast_exact::<PyDict>() {
        dict.items()
    } else if let Ok(mapping) = gradients.cast::<PyMapping>() {
        mapping.items()?
    } else {
        return Err(PyTypeError::new_err(format!(
            "{prefix}gradients must be a mapping of str to numbers, got {}",
            type_name(gradients)
        )));
    };
    Ok(items.into_iter().map(move |item| {
        let (key, value) = item.extract::<(Bound<'py, PyAny>, Bound<'py, PyAny>)>()?;
        match key.cast_into::<PyString>() {
            Ok(key) => Ok((key, value)),
            Err(error) => {
                let key = error.into_inner();
                Err(PyTypeError::new_err(format!(
                    "{prefix}gradient keys must be str, got {} {}",
                    type_name(&key),
                    repr(&key)
                )))
            }
        }
    }))
}

/// The key's code points as a core [`Key`], borrowed when the string is valid UTF-8.
fn key_of<'a>(key: &'a Bound<'_, PyString>) -> PyResult<Key<'a>> {
    match key.to_str() {
        Ok(text) => Ok(Key::from(text)),
        // Lone surrogates: keep them, as Python's json escapes them.
        Err(_) => {
            let bytes = key.call_method1("encode", ("utf-8", "surrogatepass"))?;
            Ok(Key::from_bytes(
                bytes.cast::<PyBytes>()?.as_bytes().to_vec(),
            ))
        }
    }
}

/// Where a value comes from, for error messages: `gradient 'k'` or `gradient 'k' from node`.
struct Site<'a, 'py> {
    key: &'a Bound<'py, PyAny>,
    label: Option<&'a str>,
}

impl fmt::Display for Site<'_, '_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gradient {}", repr(self.key))?;
        match self.label {
            Some(label) => write!(f, " from {label}"),
            None => Ok(()),
        }
    }
}

impl Site<'_, '_> {
    fn type_error(&self, problem: impl fmt::Display) -> PyErr {
        PyTypeError::new_err(format!("{self}: {problem}"))
    }

    fn not_a_number(&self, item: &Bound<'_, PyAny>) -> PyErr {
        self.type_error(format_args!(
            "expected numbers, found {} {}",
            type_name(item),
            repr(item)
        ))
    }
}

/// What kind of gradient value a Python object is, checked as the reference checks it.
enum Kind<'py> {
    /// A NumPy array of a numeric dtype.
    Array(Bound<'py, PyUntypedArray>),
    /// A NumPy scalar of a numeric dtype.
    NumpyScalar,
    /// A list or tuple (contents not yet checked).
    Sequence,
    Float(f64),
    Int(Bound<'py, PyInt>),
}

fn classify<'py>(site: &Site<'_, 'py>, value: &Bound<'py, PyAny>) -> PyResult<Kind<'py>> {
    let py = value.py();
    if let Ok(array) = value.cast::<PyUntypedArray>() {
        check_numeric_dtype(site, &array.dtype())?;
        return Ok(Kind::Array(array.clone()));
    }
    if value.is_instance(numpy_generic(py)?)? {
        check_numeric_dtype(site, &value.getattr("dtype")?.cast_into()?)?;
        return Ok(Kind::NumpyScalar);
    }
    if is_sequence(value) {
        return Ok(Kind::Sequence);
    }
    if let Ok(float) = value.cast::<PyFloat>() {
        return Ok(Kind::Float(float.value()));
    }
    if !value.is_instance_of::<PyBool>() {
        if let Ok(int) = value.cast::<PyInt>() {
            return Ok(Kind::Int(int.clone()));
        }
    }
    Err(site.type_error(format_args!(
        "expected a number or a list of numbers, got {}",
        type_name(value)
    )))
}

fn check_numeric_dtype(
    site: &Site<'_, '_>,
    dtype: &Bound<'_, numpy::PyArrayDescr>,
) -> PyResult<()> {
    if matches!(dtype.kind(), b'i' | b'u' | b'f') {
        Ok(())
    } else {
        Err(site.type_error(format_args!(
            "array dtype {} is not numeric (expected a float or int dtype)",
            dtype.str()?.to_string_lossy()
        )))
    }
}

fn numpy_generic(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    static GENERIC: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    GENERIC.import(py, "numpy", "generic")
}

fn is_sequence(value: &Bound<'_, PyAny>) -> bool {
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

/// Whether the array can be read in place as `T`: its dtype is `T` (native byte order) and its
/// data is aligned.
fn viewable_as<T: Element>(array: &Bound<'_, PyUntypedArray>) -> bool {
    array.cast::<PyArrayDyn<T>>().is_ok() && array.is_aligned()
}

/// The array as `T`: itself when [`viewable_as`], else a copy converted by NumPy.
fn array_as<'py, T: Element>(
    array: &Bound<'py, PyUntypedArray>,
) -> PyResult<PyReadonlyArrayDyn<'py, T>> {
    let typed = if viewable_as::<T>(array) {
        array.cast::<PyArrayDyn<T>>()?.clone()
    } else {
        array
            .call_method1("astype", (numpy::dtype::<T>(array.py()),))?
            .cast_into::<PyArrayDyn<T>>()?
    };
    Ok(typed.try_readonly()?)
}

/// The array's values in row-major order: borrowed in place when C-contiguous, else copied.
fn row_major<'a, T: Element + Copy>(array: &'a PyReadonlyArrayDyn<'_, T>) -> Cow<'a, [T]> {
    match array.as_slice() {
        Ok(slice) if array.is_c_contiguous() => Cow::Borrowed(slice),
        _ => Cow::Owned(array.as_array().iter().copied().collect()),
    }
}

// ---------------------------------------------------------------------------------------------
// canonical_hash

/// A gradient value for hashing, holding what the core value borrows.
enum HashSource<'py> {
    Plain(Value<'static>),
    F64(PyReadonlyArrayDyn<'py, f64>),
    F32(PyReadonlyArrayDyn<'py, f32>),
    I64(PyReadonlyArrayDyn<'py, i64>),
    U64(PyReadonlyArrayDyn<'py, u64>),
}

impl HashSource<'_> {
    /// The core value; a plain value is moved out, an array is borrowed.
    fn take(&mut self) -> Value<'_> {
        let numbers = match self {
            HashSource::Plain(value) => return mem::replace(value, Value::List(Vec::new())),
            HashSource::F64(a) => Numbers::new(a.shape().to_vec(), NumberData::F64(row_major(a))),
            HashSource::F32(a) => Numbers::new(a.shape().to_vec(), NumberData::F32(row_major(a))),
            HashSource::I64(a) => Numbers::new(a.shape().to_vec(), NumberData::I64(row_major(a))),
            HashSource::U64(a) => Numbers::new(a.shape().to_vec(), NumberData::U64(row_major(a))),
        };
        Value::Array(Box::new(numbers))
    }
}

fn hash_source<'py>(site: &Site<'_, 'py>, value: &Bound<'py, PyAny>) -> PyResult<HashSource<'py>> {
    Ok(match classify(site, value)? {
        Kind::Array(array) => hash_array(site, &array)?,
        // `.tolist()` gives a Python float or int (or, for long double, a NumPy scalar that
        // json cannot serialise).
        Kind::NumpyScalar => {
            let plain = value.call_method0("tolist")?;
            if let Ok(float) = plain.cast::<PyFloat>() {
                HashSource::Plain(Value::Float(float.value()))
            } else if let Ok(int) = plain.cast::<PyInt>() {
                HashSource::Plain(int_value(int)?)
            } else {
                let what = format!("object of type {}", type_name(&plain));
                return Err(not_serialisable(site, what));
            }
        }
        Kind::Sequence => HashSource::Plain(plain_sequence(site, value)?),
        Kind::Float(x) => HashSource::Plain(Value::Float(x)),
        Kind::Int(int) => HashSource::Plain(int_value(&int)?),
    })
}

fn hash_array<'py>(
    site: &Site<'_, 'py>,
    array: &Bound<'py, PyUntypedArray>,
) -> PyResult<HashSource<'py>> {
    if viewable_as::<f64>(array) {
        return Ok(HashSource::F64(array_as(array)?));
    }
    if viewable_as::<f32>(array) {
        return Ok(HashSource::F32(array_as(array)?));
    }
    let dtype = array.dtype();
    Ok(match dtype.kind() {
        b'i' => HashSource::I64(array_as(array)?),
        b'u' => HashSource::U64(array_as(array)?),
        // float16, or float32/float64 in another byte order or unaligned: exact in float64.
        _ if dtype.itemsize() <= 8 => HashSource::F64(array_as(array)?),
        // long double: `.tolist()` keeps NumPy scalars, which json.dumps rejects.
        _ => return Err(not_serialisable(site, format_args!("array dtype {dtype}"))),
    })
}

fn not_serialisable(site: &Site<'_, '_>, what: impl fmt::Display) -> PyErr {
    site.type_error(format_args!("{what} is not JSON serializable"))
}

/// A Python int: in 64 bits when it fits, else its `int.__repr__` digits.
fn int_value(int: &Bound<'_, PyInt>) -> PyResult<Value<'static>> {
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
fn plain_sequence(site: &Site<'_, '_>, seq: &Bound<'_, PyAny>) -> PyResult<Value<'static>> {
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

// ---------------------------------------------------------------------------------------------
// weighted_average

/// A gradient value for averaging, holding what the core tensor borrows.
enum AverageSource<'py> {
    Owned(Tensor<'static>),
    F64(PyReadonlyArrayDyn<'py, f64>),
    F32(PyReadonlyArrayDyn<'py, f32>),
}

impl AverageSource<'_> {
    /// The core tensor; an owned tensor is moved out, an array is borrowed.
    fn take(&mut self) -> Tensor<'_> {
        match self {
            AverageSource::Owned(tensor) => mem::replace(
                tensor,
                Tensor::new(vec![0], TensorData::F64(Cow::Borrowed(&[]))),
            ),
            AverageSource::F64(a) => Tensor::new(a.shape().to_vec(), TensorData::F64(row_major(a))),
            AverageSource::F32(a) => Tensor::new(a.shape().to_vec(), TensorData::F32(row_major(a))),
        }
    }
}

type NodeSources<'py> = Vec<(Bound<'py, PyString>, AverageSource<'py>)>;

/// Check one update and collect its values.
fn node_sources<'py>(update: &Bound<'py, PyAny>, label: &str) -> PyResult<NodeSources<'py>> {
    let mut sources = Vec::new();
    for entry in gradient_entries(update, Some(label))? {
        let (key, value) = entry?;
        let site = Site {
            key: key.as_any(),
            label: Some(label),
        };
        let source = average_source(&site, &value)?;
        sources.push((key, source));
    }
    Ok(sources)
}

fn average_source<'py>(
    site: &Site<'_, 'py>,
    value: &Bound<'py, PyAny>,
) -> PyResult<AverageSource<'py>> {
    let scalar =
        |x: f64| AverageSource::Owned(Tensor::new(vec![], TensorData::F64(vec![x].into())));
    Ok(match classify(site, value)? {
        Kind::Array(array) if viewable_as::<f32>(&array) => AverageSource::F32(array_as(&array)?),
        Kind::Array(array) => AverageSource::F64(array_as(&array)?),
        Kind::NumpyScalar | Kind::Int(_) => scalar(value.extract::<f64>()?),
        Kind::Float(x) => scalar(x),
        Kind::Sequence => {
            let (shape, values) = Rectangle::of(site, value)?;
            AverageSource::Owned(Tensor::new(shape, TensorData::F64(values.into())))
        }
    })
}

/// Flattens a nested list into a row-major array, as `np.asarray(..., dtype=float64)` does.
struct Rectangle {
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
    fn of(site: &Site<'_, '_>, seq: &Bound<'_, PyAny>) -> PyResult<(Vec<usize>, Vec<f64>)> {
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

/// `float(obj)`, exactly as the reference converts weights.
fn python_float(obj: &Bound<'_, PyAny>) -> PyResult<f64> {
    match obj.cast_exact::<PyFloat>() {
        Ok(float) => Ok(float.value()),
        Err(_) => obj.py().get_type::<PyFloat>().call1((obj,))?.extract(),
    }
}

/// A core error as a `ValueError`, naming keys as Python's `repr` does.
fn value_error(py: Python<'_>, error: &AverageError) -> PyErr {
    PyValueError::new_err(error.message_with(&|key| key_repr(py, key)))
}

/// Python's `repr` of the `str` a core key came from.
fn key_repr(py: Python<'_>, key: &Key<'_>) -> String {
    PyBytes::new(py, key.as_bytes())
        .call_method1("decode", ("utf-8", "surrogatepass"))
        .map_or_else(|_| key.to_string(), |text| repr(&text).into_owned())
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type().name().map_or_else(
        |_| "object".to_owned(),
        |name| name.to_string_lossy().into_owned(),
    )
}

fn repr(obj: &Bound<'_, PyAny>) -> Cow<'static, str> {
    obj.repr().map_or(Cow::Borrowed("<unrepresentable>"), |r| {
        Cow::Owned(r.to_string_lossy().into_owned())
    })
}
