//! Reading a gradient map: its entries, where each value comes from, and what kind it is.

use std::borrow::Cow;
use std::fmt;

use numpy::npyffi::PyArray_CheckExact;
use numpy::{PyArrayDescrMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyMapping, PyString, PyType};

use super::lists::is_sequence;
use crate::key::Key;

/// The `(key, value)` pairs of a gradient map, each key checked to be a `str` as it comes.
///
/// Errors name the update (`label`) when there is one.
pub(super) fn gradient_entries<'py>(
    gradients: &Bound<'py, PyAny>,
    label: Option<&str>,
) -> PyResult<impl Iterator<Item = PyResult<(Bound<'py, PyString>, Bound<'py, PyAny>)>> + 'py> {
    let prefix = label.map(|label| format!("{label}: ")).unwrap_or_default();
    // Exactly a dict: its entries directly, without a list of tuples (a subclass may override
    // `items`, so it is asked for them).
    let items: Vec<(Bound<'py, PyAny>, Bound<'py, PyAny>)> =
        if let Ok(dict) = gradients.cast_exact::<PyDict>() {
            dict.iter().collect()
        } else if let Ok(mapping) = gradients.cast::<PyMapping>() {
            mapping
                .items()?
                .iter()
                .map(|item| item.extract())
                .collect::<PyResult<_>>()?
        } else {
            return Err(PyTypeError::new_err(format!(
                "{prefix}gradients must be a mapping of str to numbers, got {}",
                type_name(gradients)
            )));
        };
    Ok(items
        .into_iter()
        .map(move |(key, value)| match key.cast_into::<PyString>() {
            Ok(key) => Ok((key, value)),
            Err(error) => {
                let key = error.into_inner();
                Err(PyTypeError::new_err(format!(
                    "{prefix}gradient keys must be str, got {} {}",
                    type_name(&key),
                    repr(&key)
                )))
            }
        }))
}

/// The key's code points as a core [`Key`], borrowed when the string is valid UTF-8.
pub(super) fn key_of<'a>(key: &'a Bound<'_, PyString>) -> PyResult<Key<'a>> {
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
pub(super) struct Site<'a, 'py> {
    pub(super) key: &'a Bound<'py, PyAny>,
    pub(super) label: Option<&'a str>,
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
    pub(super) fn type_error(&self, problem: impl fmt::Display) -> PyErr {
        PyTypeError::new_err(format!("{self}: {problem}"))
    }

    pub(super) fn not_a_number(&self, item: &Bound<'_, PyAny>) -> PyErr {
        self.type_error(format_args!(
            "expected numbers, found {} {}",
            type_name(item),
            repr(item)
        ))
    }
}

/// What kind of gradient value a Python object is, checked as the reference checks it.
pub(super) enum Kind<'py> {
    /// A NumPy array of a numeric dtype.
    Array(Bound<'py, PyUntypedArray>),
    /// A NumPy scalar of a numeric dtype.
    NumpyScalar,
    /// A list or tuple (contents not yet checked).
    Sequence,
    Float(f64),
    Int(Bound<'py, PyInt>),
}

pub(super) fn classify<'py>(
    site: &Site<'_, 'py>,
    value: &Bound<'py, PyAny>,
) -> PyResult<Kind<'py>> {
    let py = value.py();
    if let Ok(array) = value.cast::<PyUntypedArray>() {
        // SAFETY: the GIL is held and `value` is a live object.
        if unsafe { PyArray_CheckExact(py, value.as_ptr()) } == 0 {
            return Err(site.type_error(format_args!(
                "{} is a NumPy array subclass, which is not accepted: pass a plain numpy.ndarray",
                type_name(value)
            )));
        }
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

pub(super) fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type().name().map_or_else(
        |_| "object".to_owned(),
        |name| name.to_string_lossy().into_owned(),
    )
}

pub(super) fn repr(obj: &Bound<'_, PyAny>) -> Cow<'static, str> {
    obj.repr().map_or(Cow::Borrowed("<unrepresentable>"), |r| {
        Cow::Owned(r.to_string_lossy().into_owned())
    })
}
