//! A graph's inputs and outputs as ONNX Runtime describes them, the element-type mapping, and
//! the completion of a model's configuration from its graph (Triton's auto-complete; the rules are
//! in the backend's documentation in [`super`]).

use ort::session::Session;
use ort::value::{TensorElementType, ValueType};

use super::AUTO_MAX_BATCH_SIZE;
use crate::config::{ModelConfig, TensorConfig};
use crate::datatype::DataType;

/// A graph input or output as ONNX Runtime describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct GraphTensor {
    pub(super) name: String,
    /// `Err` describes a value this backend cannot move (a sequence, a map, an exotic type).
    pub(super) datatype: Result<DataType, String>,
    /// Dimensions, -1 where dynamic.
    pub(super) dims: Vec<i64>,
}

/// A graph's inputs and outputs, in graph order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Graph {
    pub(super) inputs: Vec<GraphTensor>,
    pub(super) outputs: Vec<GraphTensor>,
}

impl Graph {
    pub(super) fn of(session: &Session) -> Graph {
        let describe = |o: &ort::value::Outlet| GraphTensor {
            name: o.name().to_string(),
            datatype: match o.dtype() {
                ValueType::Tensor { ty, .. } => datatype_of(*ty)
                    .ok_or_else(|| format!("element type {ty} has no KServe datatype")),
                other => Err(format!("{other:?} is not a tensor")),
            },
            dims: match o.dtype() {
                ValueType::Tensor { shape, .. } => shape.iter().map(|d| (*d).max(-1)).collect(),
                _ => Vec::new(),
            },
        };
        Graph {
            inputs: session.inputs().iter().map(describe).collect(),
            outputs: session.outputs().iter().map(describe).collect(),
        }
    }
}

/// ONNX element type → our datatype (`None`: none of ours matches).
pub(super) fn datatype_of(ty: TensorElementType) -> Option<DataType> {
    Some(match ty {
        TensorElementType::Float32 => DataType::Fp32,
        TensorElementType::Float64 => DataType::Fp64,
        TensorElementType::Float16 => DataType::Fp16,
        TensorElementType::Bfloat16 => DataType::Bf16,
        TensorElementType::Int64 => DataType::Int64,
        TensorElementType::Int32 => DataType::Int32,
        TensorElementType::Int16 => DataType::Int16,
        TensorElementType::Int8 => DataType::Int8,
        TensorElementType::Uint64 => DataType::Uint64,
        TensorElementType::Uint32 => DataType::Uint32,
        TensorElementType::Uint16 => DataType::Uint16,
        TensorElementType::Uint8 => DataType::Uint8,
        TensorElementType::Bool => DataType::Bool,
        TensorElementType::String => DataType::Bytes,
        _ => return None,
    })
}

/// Our datatype → ONNX element type (BYTES is an ONNX string tensor).
pub(super) fn element_type_of(datatype: DataType) -> TensorElementType {
    match datatype {
        DataType::Fp32 => TensorElementType::Float32,
        DataType::Fp64 => TensorElementType::Float64,
        DataType::Fp16 => TensorElementType::Float16,
        DataType::Bf16 => TensorElementType::Bfloat16,
        DataType::Int64 => TensorElementType::Int64,
        DataType::Int32 => TensorElementType::Int32,
        DataType::Int16 => TensorElementType::Int16,
        DataType::Int8 => TensorElementType::Int8,
        DataType::Uint64 => TensorElementType::Uint64,
        DataType::Uint32 => TensorElementType::Uint32,
        DataType::Uint16 => TensorElementType::Uint16,
        DataType::Uint8 => TensorElementType::Uint8,
        DataType::Bool => TensorElementType::Bool,
        DataType::Bytes => TensorElementType::String,
    }
}

/// Completes and checks `config` against the graph (the rules are in the module documentation).
/// The error names the tensor at fault.
pub(super) fn complete_config(
    mut config: ModelConfig,
    graph: &Graph,
) -> Result<ModelConfig, String> {
    for (kind, list) in [("input", &graph.inputs), ("output", &graph.outputs)] {
        for t in list {
            if let Err(why) = &t.datatype {
                return Err(format!(
                    "the graph's {kind} '{}' cannot be served: {why}",
                    t.name
                ));
            }
        }
    }
    if config.input.is_empty()
        && config.output.is_empty()
        && config.max_batch_size == 0
        && graph
            .inputs
            .iter()
            .chain(&graph.outputs)
            .all(|t| t.dims.first() == Some(&-1))
    {
        config.max_batch_size = AUTO_MAX_BATCH_SIZE;
    }
    let batching = config.batching();
    let fill = |list: &[GraphTensor]| -> Vec<TensorConfig> {
        list.iter()
            .map(|t| TensorConfig {
                name: t.name.clone(),
                data_type: t
                    .datatype
                    .as_ref()
                    .map(|d| d.config_name())
                    .unwrap_or_default(),
                dims: t.dims[usize::from(batching).min(t.dims.len())..].to_vec(),
                optional: false,
            })
            .collect()
    };
    if config.input.is_empty() {
        config.input = fill(&graph.inputs);
    }
    if config.output.is_empty() {
        config.output = fill(&graph.outputs);
    }
    for (kind, configured, in_graph) in [
        ("input", &config.input, &graph.inputs),
        ("output", &config.output, &graph.outputs),
    ] {
        for c in configured.iter() {
            check_tensor(kind, c, in_graph, batching, config.max_batch_size)?;
        }
    }
    if let Some(missing) = graph
        .inputs
        .iter()
        .find(|g| !config.input.iter().any(|c| c.name == g.name))
    {
        return Err(format!(
            "the graph's input '{}' is missing from the configuration (ONNX Runtime needs every \
             input)",
            missing.name
        ));
    }
    if config.platform.is_empty() && config.backend.is_empty() {
        config.platform = "onnxruntime_onnx".to_string();
        config.backend = "onnxruntime".to_string();
    }
    config.validate().map_err(|e| e.to_string())?;
    Ok(config)
}

fn check_tensor(
    kind: &str,
    c: &TensorConfig,
    graph: &[GraphTensor],
    batching: bool,
    max_batch_size: u32,
) -> Result<(), String> {
    let Some(g) = graph.iter().find(|g| g.name == c.name) else {
        let names: Vec<&str> = graph.iter().map(|g| g.name.as_str()).collect();
        return Err(format!(
            "{kind} '{}' is not in the graph (its {kind}s: {})",
            c.name,
            names.join(", ")
        ));
    };
    let configured = DataType::from_config_name(&c.data_type).map_err(|_| {
        format!(
            "{kind} '{}' has unknown data_type '{}'",
            c.name, c.data_type
        )
    })?;
    let actual = g
        .datatype
        .clone()
        .map_err(|why| format!("{kind} '{}': {why}", c.name))?;
    if configured != actual {
        return Err(format!(
            "{kind} '{}' is {} in the configuration but {} in the graph",
            c.name,
            configured.config_name(),
            actual.config_name()
        ));
    }
    let graph_dims = if batching {
        match g.dims.split_first() {
            Some((-1, rest)) => rest,
            Some((first, _)) => {
                return Err(format!(
                    "{kind} '{}' has a fixed first dimension {first} in the graph; with \
                     max_batch_size {max_batch_size} it must be dynamic (or set max_batch_size 0)",
                    c.name
                ));
            }
            None => {
                return Err(format!(
                    "{kind} '{}' is a scalar in the graph; with max_batch_size {max_batch_size} it \
                     needs a batch dimension (or set max_batch_size 0)",
                    c.name
                ));
            }
        }
    } else {
        &g.dims[..]
    };
    let compatible = graph_dims.len() == c.dims.len()
        && graph_dims
            .iter()
            .zip(&c.dims)
            .all(|(g, c)| *g == -1 || g == c);
    if !compatible {
        return Err(format!(
            "{kind} '{}' has dims {:?} in the configuration but {:?} in the graph{}",
            c.name,
            c.dims,
            graph_dims,
            if batching {
                " (without the batch dimension)"
            } else {
                ""
            }
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, datatype: DataType, dims: &[i64]) -> GraphTensor {
        GraphTensor {
            name: name.into(),
            datatype: Ok(datatype),
            dims: dims.to_vec(),
        }
    }

    fn add_mul() -> Graph {
        Graph {
            inputs: vec![
                t("A", DataType::Fp32, &[-1, 4]),
                t("B", DataType::Fp32, &[-1, 4]),
            ],
            outputs: vec![
                t("SUM", DataType::Fp32, &[-1, 4]),
                t("PRODUCT", DataType::Fp32, &[-1, 4]),
            ],
        }
    }

    fn named(name: &str) -> ModelConfig {
        ModelConfig {
            name: name.into(),
            ..ModelConfig::default()
        }
    }

    #[test]
    fn empty_config_is_filled_and_batches_when_all_first_dims_are_dynamic() {
        let c = complete_config(named("m"), &add_mul()).unwrap();
        assert_eq!(c.max_batch_size, AUTO_MAX_BATCH_SIZE);
        assert_eq!(c.input.len(), 2);
        assert_eq!(c.input[0].name, "A");
        assert_eq!(c.input[0].data_type, "TYPE_FP32");
        assert_eq!(c.input[0].dims, vec![4]);
        assert_eq!(c.output[1].name, "PRODUCT");
        assert_eq!(c.full_shape(&c.output[1]), vec![-1, 4]);
        assert_eq!(c.backend, "onnxruntime");
    }

    #[test]
    fn fixed_first_dim_does_not_batch() {
        let g = Graph {
            inputs: vec![t("X", DataType::Fp32, &[2, 3])],
            outputs: vec![t("Y", DataType::Fp32, &[-1, 3])],
        };
        let c = complete_config(named("m"), &g).unwrap();
        assert_eq!(c.max_batch_size, 0);
        assert_eq!(c.input[0].dims, vec![2, 3]);
        assert_eq!(c.output[0].dims, vec![-1, 3]);
    }

    #[test]
    fn explicit_max_batch_size_is_kept_and_needs_dynamic_first_dims() {
        let mut c = named("m");
        c.max_batch_size = 8;
        let done = complete_config(c.clone(), &add_mul()).unwrap();
        assert_eq!(done.max_batch_size, 8);
        assert_eq!(done.input[1].dims, vec![4]);
        let g = Graph {
            inputs: vec![t("X", DataType::Fp32, &[2, 3])],
            outputs: vec![t("Y", DataType::Fp32, &[2, 3])],
        };
        let e = complete_config(c, &g).unwrap_err();
        assert!(
            e.contains("'X'") && e.contains("fixed first dimension 2"),
            "{e}"
        );
    }

    #[test]
    fn listed_tensors_are_checked_by_name_type_and_dims() {
        let base = |input: &str| {
            ModelConfig::from_json(&format!(
                r#"{{"name":"m","max_batch_size":4,"input":[{input}]}}"#
            ))
            .unwrap()
        };
        let ok = base(
            r#"{"name":"A","data_type":"TYPE_FP32","dims":[4]},{"name":"B","data_type":"TYPE_FP32","dims":[4]}"#,
        );
        let done = complete_config(ok, &add_mul()).unwrap();
        assert_eq!(done.output.len(), 2, "outputs filled from the graph");

        // A size where the graph is dynamic is fine; a dynamic one where it is fixed is not.
        let dynamic = Graph {
            inputs: vec![t("X", DataType::Fp32, &[-1, -1])],
            outputs: vec![t("Y", DataType::Fp32, &[-1, -1])],
        };
        let fixed = base(r#"{"name":"X","data_type":"TYPE_FP32","dims":[7]}"#);
        assert_eq!(
            complete_config(fixed, &dynamic).unwrap().input[0].dims,
            vec![7]
        );
        let e = complete_config(
            base(
                r#"{"name":"A","data_type":"TYPE_FP32","dims":[4]},{"name":"B","data_type":"TYPE_FP32","dims":[-1]}"#,
            ),
            &add_mul(),
        )
        .unwrap_err();
        assert!(
            e.contains("'B'") && e.contains("[-1]") && e.contains("[4]"),
            "{e}"
        );

        let e = complete_config(
            base(r#"{"name":"C","data_type":"TYPE_FP32","dims":[4]}"#),
            &add_mul(),
        )
        .unwrap_err();
        assert!(e.contains("'C'") && e.contains("A, B"), "{e}");

        let e = complete_config(
            base(
                r#"{"name":"A","data_type":"TYPE_INT64","dims":[4]},{"name":"B","data_type":"TYPE_FP32","dims":[4]}"#,
            ),
            &add_mul(),
        )
        .unwrap_err();
        assert!(
            e.contains("'A'") && e.contains("TYPE_INT64") && e.contains("TYPE_FP32"),
            "{e}"
        );

        let e = complete_config(
            base(
                r#"{"name":"A","data_type":"TYPE_FP32","dims":[5]},{"name":"B","data_type":"TYPE_FP32","dims":[4]}"#,
            ),
            &add_mul(),
        )
        .unwrap_err();
        assert!(e.contains("'A'") && e.contains("[5]"), "{e}");

        let e = complete_config(
            base(r#"{"name":"A","data_type":"TYPE_FP32","dims":[4]}"#),
            &add_mul(),
        )
        .unwrap_err();
        assert!(e.contains("'B'") && e.contains("missing"), "{e}");
    }

    #[test]
    fn string_tensors_are_bytes_and_unsupported_graph_tensors_are_refused_by_name() {
        let g = Graph {
            inputs: vec![t("S", DataType::Bytes, &[-1])],
            outputs: vec![t("T", DataType::Bytes, &[-1])],
        };
        let c = complete_config(named("m"), &g).unwrap();
        assert_eq!(c.input[0].data_type, "TYPE_STRING");
        assert_eq!(c.output[0].data_type, "TYPE_STRING");
        assert_eq!(c.max_batch_size, AUTO_MAX_BATCH_SIZE);
        let g = Graph {
            inputs: vec![GraphTensor {
                name: "Q".into(),
                datatype: Err("element type c64 has no KServe datatype".into()),
                dims: vec![-1],
            }],
            outputs: vec![t("T", DataType::Fp32, &[-1])],
        };
        let e = complete_config(named("m"), &g).unwrap_err();
        assert!(e.contains("'Q'") && e.contains("c64"), "{e}");
    }

    #[test]
    fn element_types_round_trip() {
        for d in DataType::ALL {
            assert_eq!(datatype_of(element_type_of(d)), Some(d));
        }
    }
}
