//! `dequantise_average`: the weighted average of one key's compressed updates
//! (`average::dequantise_average`) for `aumai_fedtrain.compression.average_encoded`.

use numpy::PyReadonlyArray1;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use super::numpy_array;
use crate::average::{self, Codes, Levels, Precision};

/// The weighted average of ``count`` values encoded by ``codec`` in each update (``codes``
/// as contiguous uint8 arrays, ``scales`` contiguous float32 arrays for a blockwise codec),
/// in the model's float type ``dtype`` (``"float16"``, ``"float32"`` or ``"float64"``), as a
/// flat array: decoding each update and averaging, bit for bit, in one pass.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn dequantise_average<'py>(
    py: Python<'py>,
    codec: &str,
    block_size: usize,
    dtype: &str,
    count: usize,
    codes: Vec<PyReadonlyArray1<'py, u8>>,
    scales: Vec<Option<PyReadonlyArray1<'py, f32>>>,
    weights: Vec<f64>,
) -> PyResult<Bound<'py, PyAny>> {
    let precision = match dtype {
        "float16" => Precision::Half,
        "float32" => Precision::Single,
        "float64" => Precision::Double,
        _ => {
            return Err(PyValueError::new_err(format!(
                "cannot decode to dtype {dtype}"
            )))
        }
    };
    if scales.len() != codes.len() {
        return Err(PyValueError::new_err(format!(
            "got {} scale arrays for {} code arrays",
            scales.len(),
            codes.len()
        )));
    }
    let code_slices = codes
        .iter()
        .map(|array| array.as_slice().map_err(contiguous))
        .collect::<PyResult<Vec<&[u8]>>>()?;
    let mut terms = Vec::with_capacity(codes.len());
    for (index, (bytes, scales)) in code_slices.into_iter().zip(&scales).enumerate() {
        let levels = match codec {
            "int8" => Levels::Int8,
            "int4" => Levels::Int4,
            "e3m0" => Levels::E3m0,
            "fp16" => {
                terms.push(Codes::Fp16(bytes));
                continue;
            }
            "bf16" => {
                terms.push(Codes::Bf16(bytes));
                continue;
            }
            _ => {
                return Err(PyValueError::new_err(format!(
                    "codec {codec:?} has no codes"
                )))
            }
        };
        let scales = scales.as_ref().ok_or_else(|| {
            PyValueError::new_err(format!("update #{index}: codec {codec} needs scales"))
        })?;
        terms.push(Codes::Blockwise {
            levels,
            codes: bytes,
            scales: scales.as_slice().map_err(contiguous)?,
            block: block_size,
        });
    }
    let result = py
        .detach(|| average::dequantise_average(&terms, &weights, count, precision))
        .map_err(|error| PyValueError::new_err(error.to_string()))?;
    numpy_array(py, &[count], result)
}

fn contiguous(error: numpy::AsSliceError) -> PyErr {
    PyValueError::new_err(format!(
        "codes and scales must be contiguous arrays ({error})"
    ))
}
