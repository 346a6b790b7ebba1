//! The PyO3 module `aumai_fedtrain._native`: a thin layer over the core.
//!
//! With the GIL held, Python values are checked exactly as the reference
//! (`aumai_fedtrain._fallback`) checks them and turned into core values: NumPy float64,
//! float32, int64 and uint64 arrays are borrowed in place, other numeric arrays are converted
//! by NumPy, lists are copied into Rust vectors. The GIL is then released while the core
//! hashes or averages.
//!
//! - `dequant`: the average of compressed updates, dequantised in its pass;
//! - `input`: the entries of a gradient map and the kind of each value;
//! - `lists`: lists and tuples of numbers;
//! - `source`: values as core values, NumPy arrays through one array view.

mod dequant;
mod input;
mod lists;
mod robust;
mod running;
mod source;

use std::borrow::Cow;

use numpy::ndarray::{ArrayD, IxDyn};
use numpy::PyArray;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyType};

use crate::array::{Array, ArrayData};
use crate::average::{self, NodeUpdate};
use crate::error::AverageError;
use crate::hash::{self, Entries};
use crate::key::Key;
use crate::{magnitude, wire};
use input::{key_of, repr, type_name};
use pyo3::types::PyString;
use source::{average_source, gradient_sources, hash_source, Source, Take};

/// Native hot paths of aumai-fedtrain (same contract as `aumai_fedtrain._fallback`).
#[pymodule]
mod _native {
    #[pymodule_export]
    use super::dequant::dequantise_average;
    #[pymodule_export]
    use super::robust::{
        balance_statistics, median, pairwise_squared_distances, squared_distances, trimmed_mean,
    };
    #[pymodule_export]
    use super::running::WeightedSum;
    #[pymodule_export]
    use super::{canonical_hash, canonical_hashes, max_abs, weighted_average, wire_digest};

    /// The crate's version; the package refuses an extension built for another version.
    #[allow(non_upper_case_globals)]
    #[pymodule_export]
    const __version__: &str = env!("CARGO_PKG_VERSION");
}

/// SHA-256 hex digest of the canonical JSON serialisation of ``gradients``.
#[pyfunction]
fn canonical_hash(py: Python<'_>, gradients: &Bound<'_, PyAny>) -> PyResult<String> {
    let mut sources = gradient_sources(gradients, None, hash_source)?;
    let entries = take_entries(&mut sources)?;
    Ok(py.detach(|| hash::canonical_hash(entries)))
}

/// ``canonical_hash`` of each map, the maps hashed side by side on the available cores.
#[pyfunction]
fn canonical_hashes(py: Python<'_>, maps: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
    let mut sources = Vec::new();
    for map in maps.try_iter()? {
        sources.push(gradient_sources(&map?, None, hash_source)?);
    }
    let mut all: Vec<Entries<'_>> = Vec::with_capacity(sources.len());
    for map in &mut sources {
        all.push(take_entries(map)?);
    }
    Ok(py.detach(|| hash::canonical_hashes(all)))
}

/// SHA-256 hex digest of the binary wire layout of ``gradients``.
#[pyfunction]
fn wire_digest(py: Python<'_>, gradients: &Bound<'_, PyAny>) -> PyResult<String> {
    let mut sources = gradient_sources(gradients, None, average_source)?;
    let entries = take_entries(&mut sources)?;
    Ok(py.detach(|| wire::wire_digest(entries)))
}

/// Per map, per key in the map's order, the largest magnitude of the values read as float64.
#[pyfunction]
fn max_abs(py: Python<'_>, maps: &Bound<'_, PyAny>) -> PyResult<Vec<Vec<f64>>> {
    let mut sources = Vec::new();
    for map in maps.try_iter()? {
        sources.push(gradient_sources(&map?, None, average_source)?);
    }
    let arrays: Vec<Vec<Array<'_>>> = sources
        .iter_mut()
        .map(|map| map.iter_mut().map(|(_, source)| source.take()).collect())
        .collect();
    let flat: Vec<&Array<'_>> = arrays.iter().flatten().collect();
    let mut maxima = py.detach(|| magnitude::max_abs(&flat)).into_iter();
    Ok(arrays
        .iter()
        .map(|map| maxima.by_ref().take(map.len()).collect())
        .collect())
}

/// The core entries of a gradient map read by [`gradient_sources`].
fn take_entries<'s, 'py: 's, S: Take>(
    sources: &'s mut [(Bound<'py, PyString>, S)],
) -> PyResult<Vec<(Key<'s>, S::Core<'s>)>> {
    sources
        .iter_mut()
        .map(|(key, source)| Ok((key_of(key)?, source.take())))
        .collect()
}

/// Per-key weighted mean of gradient maps, accumulated in float64 and given in the carriers'
/// widest float type (see ``_fallback.weighted_average``).
#[pyfunction]
#[pyo3(signature = (updates, weights, labels = None))]
fn weighted_average<'py>(
    py: Python<'py>,
    updates: &Bound<'py, PyAny>,
    weights: &Bound<'py, PyAny>,
    labels: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    // The reference rejects an empty list before it looks at the weights.
    if updates.len()? == 0 {
        average::check_weights(&[], 0).map_err(|error| value_error(py, &error))?;
    }
    let mut batch = Batch::read(updates, weights, labels, 0, average::check_weights)?;
    let (node_updates, weights) = batch.node_updates()?;
    let averages = py
        .detach(|| average::weighted_average(&node_updates, weights))
        .map_err(|error| value_error(py, &error))?;
    let result = PyDict::new(py);
    for averaged in averages {
        let key = &batch.maps[averaged.node][averaged.entry].0;
        result.set_item(key, numpy_array(py, &averaged.shape, averaged.values)?)?;
    }
    Ok(result)
}

/// The value sources of one gradient map, in its order.
type Sources<'py> = Vec<(Bound<'py, PyString>, Source<'py, Array<'static>>)>;

/// The updates of one call, read and checked as the reference reads them: the weights first
/// (their types, then `check`), then the labels, then the maps' values.
struct Batch<'py> {
    weights: Vec<f64>,
    labels: Vec<String>,
    maps: Vec<Sources<'py>>,
}

impl<'py> Batch<'py> {
    /// Read `updates`, `weights` and `labels` (default ``update #i``), numbering updates and
    /// weights in messages from `first`.
    fn read(
        updates: &Bound<'py, PyAny>,
        weights: &Bound<'py, PyAny>,
        labels: Option<&Bound<'py, PyAny>>,
        first: usize,
        check: impl FnOnce(&[f64], usize) -> Result<(), AverageError>,
    ) -> PyResult<Self> {
        let (weights, labels) = weights_and_labels(updates, weights, labels, first, check)?;
        let mut maps = Vec::with_capacity(labels.len());
        for (update, label) in updates.try_iter()?.zip(&labels) {
            maps.push(gradient_sources(&update?, Some(label), average_source)?);
        }
        Ok(Self {
            weights,
            labels,
            maps,
        })
    }

    /// The core updates, borrowing the NumPy arrays in place, and their weights.
    fn node_updates(&mut self) -> PyResult<(Vec<NodeUpdate<'_>>, &[f64])> {
        let updates = self
            .maps
            .iter_mut()
            .zip(&self.labels)
            .map(|(entries, label)| {
                Ok(NodeUpdate {
                    label: label.clone(),
                    entries: take_entries(entries)?,
                })
            })
            .collect::<PyResult<_>>()?;
        Ok((updates, &self.weights))
    }
}

/// The weights of `updates` (their types, then `check`) and their labels (default
/// ``update #i``), numbering updates and weights in messages from `first`.
fn weights_and_labels(
    updates: &Bound<'_, PyAny>,
    weights: &Bound<'_, PyAny>,
    labels: Option<&Bound<'_, PyAny>>,
    first: usize,
    check: impl FnOnce(&[f64], usize) -> Result<(), AverageError>,
) -> PyResult<(Vec<f64>, Vec<String>)> {
    let py = updates.py();
    let count = updates.len()?;
    let weights = weights
        .try_iter()?
        .enumerate()
        .map(|(index, w)| weight_value(first + index, &w?))
        .collect::<PyResult<Vec<f64>>>()?;
    check(&weights, count).map_err(|error| value_error(py, &error))?;
    let labels: Vec<String> = match labels {
        None => (first..first + count)
            .map(|i| format!("update #{i}"))
            .collect(),
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
    Ok((weights, labels))
}

/// A new NumPy array of `shape` holding a core result.
fn numpy_array<'py>(
    py: Python<'py>,
    shape: &[usize],
    values: ArrayData<'_>,
) -> PyResult<Bound<'py, PyAny>> {
    let shape = IxDyn(shape);
    match values {
        ArrayData::F64(values) => owned_array(py, shape, values),
        ArrayData::F32(values) => owned_array(py, shape, values),
        ArrayData::F16(values) => owned_array(py, shape, values),
        ArrayData::I64(_) | ArrayData::U64(_) => unreachable!("averages are floats"),
    }
}

/// A new NumPy array of `shape` holding `values`.
fn owned_array<'py, T: numpy::Element + Clone>(
    py: Python<'py>,
    shape: IxDyn,
    values: Cow<'_, [T]>,
) -> PyResult<Bound<'py, PyAny>> {
    let values = ArrayD::from_shape_vec(shape, values.into_owned())
        .expect("the core returns as many values as the shape holds");
    Ok(PyArray::from_owned_array(py, values).into_any())
}

/// Weight #`index` as `float(obj)`, exactly as the reference converts weights: a real number
/// (`numbers.Real`: int, float, NumPy int or float scalar, ...) but not a bool.
fn weight_value(index: usize, obj: &Bound<'_, PyAny>) -> PyResult<f64> {
    if let Ok(float) = obj.cast_exact::<PyFloat>() {
        return Ok(float.value());
    }
    let py = obj.py();
    if obj.is_instance_of::<PyBool>() || !obj.is_instance(numbers_real(py)?)? {
        return Err(PyTypeError::new_err(format!(
            "weight #{index} is {} {}: weights must be real numbers (int or float)",
            type_name(obj),
            repr(obj)
        )));
    }
    py.get_type::<PyFloat>().call1((obj,))?.extract()
}

fn numbers_real(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    static REAL: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    REAL.import(py, "numbers", "Real")
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
