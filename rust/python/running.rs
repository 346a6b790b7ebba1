//! `WeightedSum`: the running weighted mean (`average::WeightedSum`) as a Python class.

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

use super::{numpy_array, value_error, Batch};
use crate::average;

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
