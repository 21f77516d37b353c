//! A generic ONNX graph served as its configuration says: inputs copied into ONNX Runtime values,
//! the configured outputs computed and copied back out. BYTES tensors are ONNX string tensors:
//! each element goes in as one string and comes out as its bytes, unchanged (ONNX Runtime keeps
//! them as `std::string`, so they need not be UTF-8; they cannot hold a NUL byte, which its C API
//! ends a string at, and such an element is refused by name).

use std::borrow::Cow;

use bytes::Bytes;
use ort::AsPointer;
use ort::memory::Allocator;
use ort::session::Session;
use ort::session::{SessionInputValue, SessionOutputs};
use ort::value::{DynTensor, DynTensorValueType, DynValue, TensorElementType, Utf8Data, ValueType};

use super::graph::{Graph, element_type_of};
use super::session::{SessionPool, Slot};
use crate::config::{ModelConfig, TensorConfig};
use crate::datatype::DataType;
use crate::error::Error;
use crate::model::Model;
use crate::tensor::{Tensor, TensorData};

/// A configured input or output and its ONNX element type.
struct Bound {
    name: String,
    datatype: DataType,
    element: TensorElementType,
}

/// A generic ONNX graph served as configured (see the module documentation).
pub struct OnnxModel {
    config: ModelConfig,
    inputs: Vec<Bound>,
    outputs: Vec<Bound>,
    pool: SessionPool,
}

impl OnnxModel {
    pub(super) fn new(
        config: ModelConfig,
        graph: &Graph,
        sessions: Vec<Session>,
    ) -> Result<OnnxModel, Error> {
        let bind = |list: &[TensorConfig]| -> Vec<Bound> {
            list.iter()
                .map(|t| {
                    let datatype = ModelConfig::datatype_of(t);
                    Bound {
                        name: t.name.clone(),
                        datatype,
                        element: element_type_of(datatype),
                    }
                })
                .collect()
        };
        let inputs = bind(&config.input);
        let outputs = bind(&config.output);
        debug_assert!(
            outputs
                .iter()
                .all(|o| graph.outputs.iter().any(|g| g.name == o.name))
        );
        let pool = SessionPool::new(
            &config.name,
            sessions,
            outputs.iter().map(|o| o.name.as_str()),
        )?;
        Ok(OnnxModel {
            config,
            inputs,
            outputs,
            pool,
        })
    }

    fn input_value(&self, t: &Tensor, bound: &Bound) -> Result<DynTensor, Error> {
        let incompatible = |reason: String| Error::Incompatible {
            name: bound.name.clone(),
            reason,
        };
        if t.datatype() != bound.datatype {
            return Err(incompatible(format!(
                "the model takes {}, not {}",
                bound.datatype,
                t.datatype()
            )));
        }
        let shape = t
            .shape()
            .iter()
            .map(|&d| i64::try_from(d))
            .collect::<Result<Vec<i64>, _>>()
            .map_err(|_| incompatible(format!("shape {:?} is too large", t.shape())))?;
        let ort_err =
            |e: ort::Error| Error::execution(&self.config.name, format!("ONNX Runtime: {e}"));
        let raw = match &t.data() {
            TensorData::Fixed(raw) => raw,
            TensorData::Bytes(elements) => {
                if let Some(i) = nul_element(t) {
                    return Err(incompatible(format!("element {i} {NUL_REFUSED}")));
                }
                if elements.len() != t.element_count() {
                    return Err(incompatible(format!(
                        "{} elements for shape {:?}",
                        elements.len(),
                        t.shape()
                    )));
                }
                let elements: Vec<Element> = elements.iter().cloned().map(Element).collect();
                let value = ort::value::Tensor::from_string_array((shape, elements.as_slice()))
                    .map_err(ort_err)?;
                return Ok(value.upcast());
            }
        };
        let size = t.datatype().element_size().unwrap_or(1);
        let expected = t.element_count().checked_mul(size);
        if expected != Some(raw.len()) {
            return Err(incompatible(format!(
                "{} bytes of data for shape {:?} of {}",
                raw.len(),
                t.shape(),
                t.datatype()
            )));
        }
        let mut value =
            DynTensor::new(&Allocator::default(), bound.element, shape).map_err(ort_err)?;
        if !raw.is_empty() {
            let dst = value.data_ptr_mut().cast::<u8>();
            if dst.is_null() {
                return Err(Error::execution(
                    &self.config.name,
                    format!("ONNX Runtime gave no buffer for input '{}'", bound.name),
                ));
            }
            // SAFETY: `value` is a CPU tensor of `bound.element` with `t.shape`, so its buffer
            // holds element_count × element size bytes, which is `raw.len()` (checked above); the
            // buffers are distinct allocations.
            unsafe { std::ptr::copy_nonoverlapping(raw.as_ptr(), dst, raw.len()) };
            if bound.datatype == DataType::Bool {
                // SAFETY: the same buffer, initialised just above; BOOL must be 0 or 1 in ONNX
                // Runtime (a C++ bool), while the wire allows any non-zero byte for true.
                let bools = unsafe { std::slice::from_raw_parts_mut(dst, raw.len()) };
                bools.iter_mut().for_each(|b| *b = u8::from(*b != 0));
            }
        }
        Ok(value)
    }
}

/// Why an element holding a NUL byte is refused.
const NUL_REFUSED: &str = "holds a NUL byte, which an ONNX Runtime string tensor cannot carry (its C API ends a string there)";

/// The first element of a BYTES tensor that holds a NUL byte, if any.
fn nul_element(t: &Tensor) -> Option<usize> {
    match t.data() {
        TensorData::Bytes(elements) => elements.iter().position(|e| e.contains(&0)),
        TensorData::Fixed(_) => None,
    }
}

impl Model for OnnxModel {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn check_request(&self, inputs: &[Tensor]) -> Result<(), String> {
        for t in inputs {
            if let Some(i) = nul_element(t) {
                return Err(format!("input '{}': element {i} {NUL_REFUSED}", t.name()));
            }
        }
        Ok(())
    }

    fn execute(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, Error> {
        let name = &self.config.name;
        if inputs.len() != self.inputs.len() {
            let expected: Vec<&str> = self.inputs.iter().map(|b| b.name.as_str()).collect();
            return Err(Error::execution(
                name,
                format!(
                    "expected {} inputs ({}), got {}",
                    expected.len(),
                    expected.join(", "),
                    inputs.len()
                ),
            ));
        }
        let rows = if self.config.batching() {
            let rows = inputs.first().map(Tensor::batch_size).unwrap_or(0);
            if let Some(t) = inputs.iter().find(|t| t.batch_size() != rows) {
                return Err(Error::execution(
                    name,
                    format!(
                        "input '{}' has {} rows, but the batch has {rows}",
                        t.name(),
                        t.batch_size()
                    ),
                ));
            }
            if rows > self.config.max_batch_size as usize {
                return Err(Error::execution(
                    name,
                    format!(
                        "a batch of {rows} is more than max_batch_size {}",
                        self.config.max_batch_size
                    ),
                ));
            }
            Some(rows)
        } else {
            None
        };
        let mut values: Vec<(Cow<'_, str>, SessionInputValue<'_>)> =
            Vec::with_capacity(inputs.len());
        for (t, bound) in inputs.iter().zip(&self.inputs) {
            values.push((
                Cow::Borrowed(bound.name.as_str()),
                self.input_value(t, bound)?.into(),
            ));
        }
        self.pool.with(|slot| {
            let Slot {
                session,
                run_options,
            } = slot;
            let mut outputs = session
                .run_with_options(values, run_options)
                .map_err(|e| Error::execution(name, format!("ONNX Runtime: {e}")))?;
            self.outputs
                .iter()
                .map(|bound| {
                    let t = take_output(name, &mut outputs, bound)?;
                    if let Some(rows) = rows
                        && t.shape().first() != Some(&rows)
                    {
                        return Err(Error::execution(
                            name,
                            format!(
                                "output '{}' has shape {:?}, not {rows} rows like the batch",
                                bound.name,
                                t.shape()
                            ),
                        ));
                    }
                    Ok(t)
                })
                .collect()
        })
    }
}

/// Moves one output out of ONNX Runtime's results into our tensor (one copy of its bytes).
fn take_output(
    model: &str,
    outputs: &mut SessionOutputs<'_>,
    bound: &Bound,
) -> Result<Tensor, Error> {
    let fail =
        |reason: String| Error::execution(model, format!("output '{}': {reason}", bound.name));
    let value: DynValue = outputs
        .remove(&bound.name)
        .ok_or_else(|| fail("ONNX Runtime returned no such output".into()))?;
    let tensor = value
        .downcast::<DynTensorValueType>()
        .map_err(|e| fail(format!("not a tensor ({e})")))?;
    let ValueType::Tensor { ty, shape, .. } = tensor.dtype() else {
        return Err(fail("not a tensor".into()));
    };
    if *ty != bound.element {
        return Err(fail(format!(
            "ONNX Runtime returned {ty}, the configuration says {}",
            bound.datatype
        )));
    }
    let dims = shape
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<Vec<usize>, _>>()
        .map_err(|_| fail(format!("shape {shape} has a negative dimension")))?;
    if !tensor.memory_info().is_cpu_accessible() {
        return Err(fail("the data is not in CPU memory".into()));
    }
    if *ty == TensorElementType::String {
        let elements = string_elements(&tensor, shape.num_elements())
            .map_err(|e| fail(format!("ONNX Runtime: {e}")))?;
        return Tensor::new(
            bound.name.clone(),
            bound.datatype,
            dims,
            TensorData::Bytes(elements),
        )
        .map_err(|e| Error::bad_output(model, e));
    }
    let len = ty
        .byte_size(shape.num_elements())
        .ok_or_else(|| fail(format!("{ty} has no fixed size")))?;
    let data = if len == 0 {
        Bytes::new()
    } else {
        let src = tensor.data_ptr().cast::<u8>();
        if src.is_null() {
            return Err(fail("ONNX Runtime gave no data".into()));
        }
        // SAFETY: a CPU-accessible, contiguous tensor of `ty` and `shape` holds `len` bytes at
        // `src`; `tensor` keeps them alive for the copy.
        Bytes::copy_from_slice(unsafe { std::slice::from_raw_parts(src, len) })
    };
    // ONNX Runtime's own byte count should agree with the shape; if it ever does not, the batch
    // fails naming the model instead of handing on a tensor that would break its consumers.
    Tensor::new(
        bound.name.clone(),
        bound.datatype,
        dims,
        TensorData::Fixed(data),
    )
    .map_err(|e| Error::bad_output(model, e))
}

/// One element of a BYTES input on its way into an ONNX string tensor: its bytes as they are
/// (`ort` would otherwise take only `str`, which BYTES need not be).
#[derive(Clone)]
struct Element(Bytes);

impl Utf8Data for Element {
    fn as_utf8_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// The `count` elements of a string tensor, each as its bytes (through ONNX Runtime's C API:
/// `ort`'s own reader insists on UTF-8, which a BYTES output need not be).
fn string_elements(tensor: &DynTensor, count: usize) -> Result<Vec<Bytes>, ort::Error> {
    if count == 0 {
        return Ok(Vec::new());
    }
    let api = ort::api();
    let mut total = 0usize;
    // SAFETY: `tensor` is a live string tensor (its element type was checked by the caller);
    // the call writes one `usize`.
    unsafe {
        ort::Error::result_from_status((api.GetStringTensorDataLength)(tensor.ptr(), &mut total))?;
    }
    let mut content = vec![0u8; total];
    let mut offsets = vec![0usize; count];
    // SAFETY: `content` holds the `total` bytes the tensor's strings take and `offsets` one
    // entry per element, as ONNX Runtime asked for them just above; both outlive the call.
    unsafe {
        ort::Error::result_from_status((api.GetStringTensorContent)(
            tensor.ptr(),
            content.as_mut_ptr().cast(),
            total,
            offsets.as_mut_ptr(),
            count,
        ))?;
    }
    let content = Bytes::from(content);
    let mut elements = Vec::with_capacity(count);
    for (i, &start) in offsets.iter().enumerate() {
        let end = offsets.get(i + 1).copied().unwrap_or(total);
        if start > end || end > total {
            return Err(ort::Error::new(format!(
                "string tensor offsets out of order at element {i}"
            )));
        }
        elements.push(content.slice(start..end));
    }
    Ok(elements)
}
