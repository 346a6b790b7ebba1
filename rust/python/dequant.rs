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
    let precision = precision_of(dtype)?;
    if scales.len() != codes.len() {
        return Err(PyValueError::new_err(format!(
            "got {} scale arrays for {} code arrays",
            scales.len(),
            codes.len()
        )));
    }
    let mut terms = Vec::with_capacity(codes.len());
    for (index, (bytes, scales)) in codes.iter().zip(&scales).enumerate() {
        let scales = scales
            .as_ref()
            .map(|scales| scales.as_slice().map_err(contiguous))
            .transpose()?;
        let bytes = bytes.as_slice().map_err(contiguous)?;
        terms.push(
            codes_of(codec, block_size, bytes, scales)
                .map_err(|problem| PyValueError::new_err(format!("update #{index}: {problem}")))?,
        );
    }
    let result = py
        .detach(|| average::dequantise_average(&terms, &weights, count, precision))
        .map_err(|error| PyValueError::new_err(error.to_string()))?;
    numpy_array(py, &[count], result)
}

/// The core's float type of a model's NumPy dtype name.
pub(super) fn precision_of(dtype: &str) -> PyResult<Precision> {
    match dtype {
        "float16" => Ok(Precision::Half),
        "float32" => Ok(Precision::Single),
        "float64" => Ok(Precision::Double),
        _ => Err(PyValueError::new_err(format!(
            "cannot decode to dtype {dtype}"
        ))),
    }
}

/// The core's view of one tensor's code `bytes` (and float32 `scales` for a blockwise codec)
/// encoded by `codec`, or why there is none.
pub(super) fn codes_of<'a>(
    codec: &str,
    block: usize,
    bytes: &'a [u8],
    scales: Option<&'a [f32]>,
) -> Result<Codes<'a>, String> {
    let levels = match codec {
        "int8" => Levels::Int8,
        "int4" => Levels::Int4,
        "e3m0" => Levels::E3m0,
        "fp16" => return Ok(Codes::Fp16(bytes)),
        "bf16" => return Ok(Codes::Bf16(bytes)),
        _ => return Err(format!("codec {codec:?} has no codes")),
    };
    let scales = scales.ok_or_else(|| format!("codec {codec} needs scales"))?;
    Ok(Codes::Blockwise {
        levels,
        codes: bytes,
        scales,
        block,
    })
}

pub(super) fn contiguous(error: numpy::AsSliceError) -> PyErr {
    PyValueError::new_err(format!(
        "codes and scales must be contiguous arrays ({error})"
    ))
}
