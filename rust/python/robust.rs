//! The robust aggregation kernels (`crate::robust`) for `aumai_fedtrain.robust`.

use numpy::ndarray::{ArrayD, IxDyn};
use numpy::PyArray;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

use super::input::repr;
use super::source::{average_source, gradient_sources, Source, Take};
use crate::array::Array;
use crate::robust::{self, RobustError};

type Sources<'py> = Vec<(Bound<'py, PyString>, Source<'py, Array<'static>>)>;

/// The maps' sources, every map with the keys of the first in the same order.
fn sources<'py>(updates: &Bound<'py, PyAny>) -> PyResult<Vec<Sources<'py>>> {
    let mut maps: Vec<Sources<'py>> = Vec::new();
    for (index, update) in updates.try_iter()?.enumerate() {
        let label = format!("update #{index}");
        let map = gradient_sources(&update?, Some(&label), average_source)?;
        if let Some(first) = maps.first() {
            check_keys(&label, &map, first)?;
        }
        maps.push(map);
    }
    Ok(maps)
}

/// A `ValueError` unless `map` has the keys of `first`, in the same order.
fn check_keys(label: &str, map: &Sources<'_>, first: &Sources<'_>) -> PyResult<()> {
    let same = map.len() == first.len()
        && map
            .iter()
            .zip(first)
            .all(|((a, _), (b, _))| PyAnyMethods::eq(a.as_any(), b).unwrap_or(false));
    if same {
        return Ok(());
    }
    let keys = |m: &Sources<'_>| -> Vec<String> {
        m.iter().map(|(key, _)| repr(key).into_owned()).collect()
    };
    Err(PyValueError::new_err(format!(
        "{label} has keys [{}], update #0 has [{}] (same keys, same order needed)",
        keys(map).join(", "),
        keys(first).join(", ")
    )))
}

fn arrays<'s>(maps: &'s mut [Sources<'_>]) -> Vec<Vec<Array<'s>>> {
    maps.iter_mut()
        .map(|map| map.iter_mut().map(|(_, source)| source.take()).collect())
        .collect()
}

fn refs<'u, 'a>(arrays: &'u [Vec<Array<'a>>]) -> Vec<Vec<&'u Array<'a>>> {
    arrays
        .iter()
        .map(|update| update.iter().collect())
        .collect()
}

fn value_error(error: RobustError) -> PyErr {
    PyValueError::new_err(error.to_string())
}

/// Key -> float64 array of the first update's shapes.
fn result_map<'py>(
    py: Python<'py>,
    keys: &Sources<'py>,
    shapes: Vec<Vec<usize>>,
    values: Vec<Vec<f64>>,
) -> PyResult<Bound<'py, PyDict>> {
    let result = PyDict::new(py);
    for (((key, _), shape), values) in keys.iter().zip(shapes).zip(values) {
        let array = ArrayD::from_shape_vec(IxDyn(&shape), values)
            .expect("the kernels return as many values as the shape holds");
        result.set_item(key, PyArray::from_owned_array(py, array))?;
    }
    Ok(result)
}

/// A coordinate-wise kernel over the maps, as a map of float64 arrays.
fn coordinatewise<'py>(
    updates: &Bound<'py, PyAny>,
    kernel: impl Fn(&robust::Updates<'_, '_>) -> Result<Vec<Vec<f64>>, RobustError> + Sync,
) -> PyResult<Bound<'py, PyDict>> {
    let py = updates.py();
    let mut maps = sources(updates)?;
    let taken = arrays(&mut maps);
    let shapes: Vec<Vec<usize>> = taken
        .first()
        .map(|first| first.iter().map(|a| a.shape().to_vec()).collect())
        .unwrap_or_default();
    let values = py.detach(|| kernel(&refs(&taken))).map_err(value_error)?;
    drop(taken);
    result_map(py, &maps[0], shapes, values)
}

/// Coordinate-wise median of gradient maps (see ``aumai_fedtrain.robust``).
#[pyfunction]
pub(super) fn median<'py>(updates: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyDict>> {
    coordinatewise(updates, robust::median)
}

/// Coordinate-wise mean without the ``trim`` smallest and largest values.
#[pyfunction]
pub(super) fn trimmed_mean<'py>(
    updates: &Bound<'py, PyAny>,
    trim: usize,
) -> PyResult<Bound<'py, PyDict>> {
    coordinatewise(updates, |u| robust::trimmed_mean(u, trim))
}

/// Each map's squared L2 distance to ``center`` (its squared norm without one).
#[pyfunction]
#[pyo3(signature = (updates, center = None))]
pub(super) fn squared_distances(
    py: Python<'_>,
    updates: &Bound<'_, PyAny>,
    center: Option<&Bound<'_, PyAny>>,
) -> PyResult<Vec<f64>> {
    let mut maps = sources(updates)?;
    let mut center_map = side_map(center, "center", &maps)?;
    let taken = arrays(&mut maps);
    let center_arrays = take_side(&mut center_map);
    let center_refs: Option<Vec<&Array<'_>>> = center_arrays.as_ref().map(|c| c.iter().collect());
    py.detach(|| robust::squared_distances(&refs(&taken), center_refs.as_deref()))
        .map_err(value_error)
}

/// The sources of a map given beside the updates (a centre, a reference), checked to have the
/// keys of update #0 in the same order.
fn side_map<'py>(
    map: Option<&Bound<'py, PyAny>>,
    label: &str,
    maps: &[Sources<'py>],
) -> PyResult<Option<Sources<'py>>> {
    let Some(map) = map else {
        return Ok(None);
    };
    let sources = gradient_sources(map, Some(label), average_source)?;
    if let Some(first) = maps.first() {
        check_keys(label, &sources, first)?;
    }
    Ok(Some(sources))
}

fn take_side<'s>(map: &'s mut Option<Sources<'_>>) -> Option<Vec<Array<'s>>> {
    map.as_mut()
        .map(|map| map.iter_mut().map(|(_, source)| source.take()).collect())
}

/// Per map: values strictly below and above ``center``, the dot product with ``reference`` and
/// the squared norm (see ``aumai_fedtrain.robust``).
#[pyfunction]
#[pyo3(signature = (updates, center = None, reference = None))]
pub(super) fn balance_statistics(
    py: Python<'_>,
    updates: &Bound<'_, PyAny>,
    center: Option<&Bound<'_, PyAny>>,
    reference: Option<&Bound<'_, PyAny>>,
) -> PyResult<Vec<(u64, u64, f64, f64)>> {
    let mut maps = sources(updates)?;
    let mut center_map = side_map(center, "center", &maps)?;
    let mut reference_map = side_map(reference, "reference", &maps)?;
    let taken = arrays(&mut maps);
    let (center_arrays, reference_arrays) =
        (take_side(&mut center_map), take_side(&mut reference_map));
    let center_refs: Option<Vec<&Array<'_>>> = center_arrays.as_ref().map(|c| c.iter().collect());
    let reference_refs: Option<Vec<&Array<'_>>> =
        reference_arrays.as_ref().map(|r| r.iter().collect());
    let statistics = py
        .detach(|| {
            robust::balance(
                &refs(&taken),
                center_refs.as_deref(),
                reference_refs.as_deref(),
            )
        })
        .map_err(value_error)?;
    Ok(statistics
        .into_iter()
        .map(|s| (s.below, s.above, s.dot, s.squared_norm))
        .collect())
}

/// The symmetric matrix of squared L2 distances between the maps.
#[pyfunction]
pub(super) fn pairwise_squared_distances(
    py: Python<'_>,
    updates: &Bound<'_, PyAny>,
) -> PyResult<Vec<Vec<f64>>> {
    let mut maps = sources(updates)?;
    let taken = arrays(&mut maps);
    py.detach(|| robust::pairwise_squared_distances(&refs(&taken)))
        .map_err(value_error)
}
