//! `WeightedSum`: the running weighted mean (`average::WeightedSum`) as a Python class.

use numpy::PyReadonlyArray1;
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyMapping, PyString, PyType};

use super::dequant::{codes_of, contiguous, precision_of};
use super::input::{key_of, repr, type_name};
use super::{key_repr, numpy_array, value_error, weights_and_labels, Batch};
use crate::average::{self, EncodedEntry, EncodedUpdate, Precision};

/// A running per-key weighted mean: ``fold`` batches of updates as they come, ``finish`` once
/// (see ``_fallback.WeightedSum``).
#[pyclass(module = "aumai_fedtrain._native")]
pub struct WeightedSum {
    /// None once finished.
    sum: Option<average::WeightedSum>,
    /// The keys, in the order the sum gives them.
    keys: Vec<Py<PyString>>,
}

#[pymethods]
impl WeightedSum {
    #[new]
    fn new() -> Self {
        Self {
            sum: Some(average::WeightedSum::new()),
            keys: Vec::new(),
        }
    }

    /// Add ``updates`` weighted by ``weights`` after those already folded; on an error nothing
    /// is added.
    #[pyo3(signature = (updates, weights, labels = None))]
    fn fold(
        &mut self,
        py: Python<'_>,
        updates: &Bound<'_, PyAny>,
        weights: &Bound<'_, PyAny>,
        labels: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let sum = self.sum.as_mut().ok_or_else(finished)?;
        let first = sum.folded();
        let mut batch = Batch::read(updates, weights, labels, first, |weights, count| {
            sum.check_weights(weights, count)
        })?;
        let (node_updates, weights) = batch.node_updates()?;
        let new_keys = py
            .detach(|| sum.fold(&node_updates, weights))
            .map_err(|error| value_error(py, &error))?;
        for (update, entry) in new_keys {
            self.keys.push(batch.maps[update][entry].0.clone().unbind());
        }
        Ok(())
    }

    /// Add encoded ``updates`` (maps of key to ``compression.Encoded``) weighted by
    /// ``weights`` after those already folded: bit for bit ``fold`` of the decoded updates,
    /// read from the codes and scales with the GIL released; on an error nothing is added.
    #[pyo3(signature = (updates, weights, labels = None))]
    fn fold_encoded(
        &mut self,
        py: Python<'_>,
        updates: &Bound<'_, PyAny>,
        weights: &Bound<'_, PyAny>,
        labels: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let sum = self.sum.as_mut().ok_or_else(finished)?;
        let (weights, labels) =
            weights_and_labels(updates, weights, labels, sum.folded(), |w, n| {
                sum.check_weights(w, n)
            })?;
        let mut maps = Vec::with_capacity(labels.len());
        for (update, label) in updates.try_iter()?.zip(&labels) {
            maps.push(encoded_sources(&update?, label)?);
        }
        let mut core = Vec::with_capacity(maps.len());
        for (map, label) in maps.iter().zip(&labels) {
            let mut entries = Vec::with_capacity(map.len());
            for source in map {
                let scales = source
                    .scales
                    .as_ref()
                    .map(|scales| scales.as_slice().map_err(contiguous))
                    .transpose()?;
                let bytes = source.codes.as_slice().map_err(contiguous)?;
                let codes = codes_of(&source.codec, source.block, bytes, scales)
                    .map_err(|p| PyValueError::new_err(format!("{}: {p}", source.site(label))))?;
                entries.push(EncodedEntry {
                    key: key_of(&source.key)?,
                    shape: source.shape.clone(),
                    precision: source.precision,
                    codes,
                });
            }
            core.push(EncodedUpdate {
                label: label.clone(),
                entries,
            });
        }
        let new_keys = py
            .detach(|| sum.fold_encoded(&core, &weights))
            .map_err(|error| PyValueError::new_err(error.message_with(&|key| key_repr(py, key))))?;
        for (update, entry) in new_keys {
            self.keys.push(maps[update][entry].key.clone().unbind());
        }
        Ok(())
    }

    /// The per-key means, keys in order of first appearance; the sum is spent afterwards.
    fn finish<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let sum = self.sum.as_ref().ok_or_else(finished)?;
        sum.check_finish()
            .map_err(|error| value_error(py, &error))?;
        let sum = self.sum.take().ok_or_else(finished)?;
        let means = py
            .detach(|| sum.finish())
            .map_err(|error| value_error(py, &error))?;
        let result = PyDict::new(py);
        for (key, mean) in self.keys.drain(..).zip(means) {
            result.set_item(key, numpy_array(py, &mean.shape, mean.values)?)?;
        }
        Ok(result)
    }
}

fn finished() -> PyErr {
    PyRuntimeError::new_err("this WeightedSum is finished: start a new one for another mean")
}

/// One tensor of an encoded update, read from its ``Encoded``.
struct EncodedSource<'py> {
    key: Bound<'py, PyString>,
    codec: String,
    block: usize,
    shape: Vec<usize>,
    precision: Precision,
    /// The codes' bytes.
    codes: PyReadonlyArray1<'py, u8>,
    scales: Option<PyReadonlyArray1<'py, f32>>,
}

impl EncodedSource<'_> {
    /// Where the tensor is, for messages.
    fn site(&self, label: &str) -> String {
        format!("gradient {} from {label}", repr(&self.key))
    }
}

/// The tensors of one encoded update (a map of str to ``Encoded``), in its order.
fn encoded_sources<'py>(
    update: &Bound<'py, PyAny>,
    label: &str,
) -> PyResult<Vec<EncodedSource<'py>>> {
    let py = update.py();
    let map = update.cast::<PyMapping>().map_err(|_| {
        PyTypeError::new_err(format!(
            "{label}: an update must be a mapping, got {}",
            type_name(update)
        ))
    })?;
    let numpy = py.import("numpy")?;
    let mut sources = Vec::new();
    for item in map.items()?.try_iter()? {
        let (key, value): (Bound<'py, PyAny>, Bound<'py, PyAny>) = item?.extract()?;
        let key = key.cast_into::<PyString>().map_err(|error| {
            PyTypeError::new_err(format!(
                "{label}: gradient keys must be str, got {}",
                type_name(&error.into_inner())
            ))
        })?;
        if !value.is_instance(encoded_type(py)?)? {
            return Err(PyTypeError::new_err(format!(
                "{label}: gradient {} is {}, expected Encoded",
                repr(&key),
                type_name(&value)
            )));
        }
        let codec = value.getattr("codec")?;
        let dtype = numpy.call_method1("dtype", (value.getattr("dtype")?,))?;
        let mut source = EncodedSource {
            codec: codec.getattr("name")?.extract()?,
            block: codec.getattr("block_size")?.extract()?,
            shape: value.getattr("shape")?.extract()?,
            precision: Precision::Double,
            codes: numpy
                .call_method1("ascontiguousarray", (value.getattr("codes")?,))?
                .call_method1("reshape", (-1,))?
                .call_method1("view", (numpy.getattr("uint8")?,))?
                .extract()?,
            scales: None,
            key,
        };
        let site = source.site(label);
        source.precision = precision_of(&dtype.getattr("name")?.extract::<String>()?)
            .map_err(|error| PyValueError::new_err(format!("{site}: {error}")))?;
        let scales = value.getattr("scales")?;
        if !scales.is_none() {
            source.scales = Some(scales.extract().map_err(|_| {
                PyValueError::new_err(format!(
                    "{site}: scales must be a 1-D float32 array, got {}",
                    repr(&scales)
                ))
            })?);
        }
        sources.push(source);
    }
    Ok(sources)
}

/// ``aumai_fedtrain.compression.Encoded``.
fn encoded_type(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    static ENCODED: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    ENCODED.import(py, "aumai_fedtrain.compression", "Encoded")
}
