use proptest::prelude::*;

use super::*;

fn value_info(name: &str) -> Vec<u8> {
    ValueInfoProto { name: name.into() }.encode_to_vec()
}

fn fp32(name: &str, dims: &[usize], values: &[f32]) -> Vec<u8> {
    let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    tensor(name, dims, FLOAT, raw)
}

/// A model: `Y = X · W` (W a constant [3, 2]), `Z = X · V` (V a graph input too: overridable, so
/// not constant), `P = Y · Q` with Q [2, 2] constant and also read by an `Add`, and fields this
/// rewrite does not know (a doc string on the model, a value info in the graph).
fn toy_model(opset: i64) -> (Vec<u8>, [f32; 6]) {
    let w = [0.5, -1.0, 0.25, 2.0, -0.125, 0.0];
    let mut graph = Vec::new();
    let nodes = [
        node("MatMul", "mm_w".into(), &["X", "W"], &["Y"]),
        node("MatMul", "mm_v".into(), &["X", "V"], &["Z"]),
        node("MatMul", String::new(), &["Y", "Q"], &["P"]),
        node("Add", "add_q".into(), &["P", "Q"], &["R"]),
    ];
    for n in &nodes {
        put_message(GRAPH_NODE, &n.encode_to_vec(), &mut graph);
    }
    put_message(2, b"toy", &mut graph); // GraphProto.name
    put_message(GRAPH_INITIALIZER, &fp32("W", &[3, 2], &w), &mut graph);
    put_message(
        GRAPH_INITIALIZER,
        &fp32("V", &[3, 2], &[1.0; 6]),
        &mut graph,
    );
    put_message(
        GRAPH_INITIALIZER,
        &fp32("Q", &[2, 2], &[1.0, 2.0, 3.0, 4.0]),
        &mut graph,
    );
    for input in ["X", "V"] {
        put_message(GRAPH_INPUT, &value_info(input), &mut graph);
    }
    for output in ["Z", "R"] {
        put_message(12, &value_info(output), &mut graph);
    }
    put_message(13, &value_info("Y"), &mut graph); // value_info
    let mut model = Vec::new();
    write_varint(1 << 3, &mut model); // ir_version = 8
    write_varint(8, &mut model);
    put_message(6, b"a doc string", &mut model);
    put_message(MODEL_GRAPH, &graph, &mut model);
    let opset = OperatorSetIdProto {
        domain: String::new(),
        version: opset,
    };
    put_message(MODEL_OPSET_IMPORT, &opset.encode_to_vec(), &mut model);
    (model, w)
}

struct Parsed {
    nodes: Vec<NodeProto>,
    initializers: HashMap<String, TensorProto>,
}

fn parse(model: &[u8]) -> Parsed {
    let top = fields(model).unwrap();
    let graph = top.iter().find(|f| f.number == MODEL_GRAPH).unwrap();
    let mut parsed = Parsed {
        nodes: Vec::new(),
        initializers: HashMap::new(),
    };
    for f in fields(graph.body).unwrap() {
        match f.number {
            GRAPH_NODE => parsed.nodes.push(NodeProto::decode(f.body).unwrap()),
            GRAPH_INITIALIZER => {
                let t = TensorProto::decode(f.body).unwrap();
                parsed.initializers.insert(t.name.clone(), t);
            }
            _ => {}
        }
    }
    parsed
}

#[test]
fn constant_matmuls_become_the_integer_pattern_and_the_rest_is_kept() {
    let (model, w) = toy_model(17);
    let q = quantize_int8(&model).unwrap();
    assert_eq!((q.matmuls, q.matmuls_total, q.weights), (2, 3, 2));
    let parsed = parse(&q.bytes);
    let ops: Vec<&str> = parsed.nodes.iter().map(|n| n.op_type.as_str()).collect();
    assert_eq!(
        ops,
        [
            "DynamicQuantizeLinear",
            "MatMulInteger",
            "Cast",
            "Mul",
            "Mul",
            "MatMul", // X · V: V is a graph input
            "DynamicQuantizeLinear",
            "MatMulInteger",
            "Cast",
            "Mul",
            "Mul",
            "Add",
        ]
    );
    // The replacement ends in the MatMul's own output, from the quantised weight.
    let [dq, mmi, cast, scale, deq] = &parsed.nodes[..5] else {
        unreachable!()
    };
    assert_eq!(dq.input, ["X"]);
    assert_eq!(
        mmi.input,
        [
            dq.output[0].as_str(),
            "W.int8",
            dq.output[2].as_str(),
            "W.int8_zero"
        ]
    );
    assert_eq!(cast.attribute[0].name, "to");
    assert_eq!(cast.attribute[0].i, i64::from(FLOAT));
    assert_eq!(scale.input, [dq.output[1].as_str(), "W.int8_scale"]);
    assert_eq!(
        deq.input,
        [cast.output[0].as_str(), scale.output[0].as_str()]
    );
    assert_eq!(deq.output, ["Y"]);
    assert_eq!(parsed.nodes[5].input, ["X", "V"]);
    assert_eq!(parsed.nodes[10].output, ["P"]);
    // Every new name is unique in the graph.
    let mut outputs: Vec<&String> = parsed.nodes.iter().flat_map(|n| &n.output).collect();
    outputs.sort();
    let before = outputs.len();
    outputs.dedup();
    assert_eq!(outputs.len(), before, "an output name is written twice");

    // W is gone (only the MatMul read it); Q stays (the Add reads it); V stays (not replaced).
    let init = &parsed.initializers;
    assert!(!init.contains_key("W"));
    assert!(init.contains_key("Q") && init.contains_key("V"));
    let (wq, ws) = (&init["W.int8"], &init["W.int8_scale"]);
    assert_eq!((wq.data_type, wq.dims.as_slice()), (INT8, &[3, 2][..]));
    assert_eq!((ws.data_type, ws.dims.as_slice()), (FLOAT, &[2][..]));
    let scales: Vec<f32> = ws
        .raw_data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(scales, [0.5 / 127.0, 2.0 / 127.0]);
    for (i, (&q, &v)) in wq.raw_data.iter().zip(&w).enumerate() {
        let back = f32::from(q as i8) * scales[i % 2];
        assert!(
            (back - v).abs() <= scales[i % 2] / 2.0,
            "W[{i}]: {v} -> {back}"
        );
    }
    assert_eq!(init["W.int8_zero"].raw_data, [0, 0]);

    // Fields the rewrite does not know survive as they were; the mark is added.
    let top = fields(&q.bytes).unwrap();
    assert!(
        top.iter()
            .any(|f| f.number == 6 && f.body == b"a doc string")
    );
    let graph = top.iter().find(|f| f.number == MODEL_GRAPH).unwrap();
    let graph_fields = fields(graph.body).unwrap();
    assert!(
        graph_fields
            .iter()
            .any(|f| f.number == 2 && f.body == b"toy")
    );
    assert!(
        graph_fields
            .iter()
            .any(|f| f.number == 13 && f.body == value_info("Y"))
    );
    let marks: Vec<StringStringEntryProto> = top
        .iter()
        .filter(|f| f.number == MODEL_METADATA)
        .map(|f| StringStringEntryProto::decode(f.body).unwrap())
        .collect();
    assert_eq!(marks.len(), 1);
    assert_eq!(marks[0].key, METADATA_KEY);
}

#[test]
fn a_quantised_graph_an_old_opset_and_a_graph_without_constant_matmuls_are_refused() {
    let (model, _) = toy_model(17);
    let once = quantize_int8(&model).unwrap();
    let e = quantize_int8(&once.bytes).unwrap_err().to_string();
    assert!(e.contains("already quantised"), "{e}");

    let (old, _) = toy_model(10);
    let e = quantize_int8(&old).unwrap_err().to_string();
    assert!(e.contains("opset is 10") && e.contains("11"), "{e}");

    let mut graph = Vec::new();
    let n = node("MatMul", "m".into(), &["A", "B"], &["C"]);
    put_message(GRAPH_NODE, &n.encode_to_vec(), &mut graph);
    let mut model = Vec::new();
    put_message(MODEL_GRAPH, &graph, &mut model);
    let opset = OperatorSetIdProto {
        domain: String::new(),
        version: 17,
    };
    put_message(MODEL_OPSET_IMPORT, &opset.encode_to_vec(), &mut model);
    let e = quantize_int8(&model).unwrap_err().to_string();
    assert!(
        e.contains("nothing to quantise") && e.contains("1 MatMul"),
        "{e}"
    );

    let e = quantize_int8(b"\x0a\xff\xff").unwrap_err().to_string();
    assert!(e.contains("not an ONNX model"), "{e}");
    let e = quantize_int8(b"").unwrap_err().to_string();
    assert!(e.contains("0 graphs"), "{e}");
}

#[test]
fn a_weight_shared_by_two_matmuls_is_quantised_once_and_an_input_once() {
    let mut graph = Vec::new();
    for (a, y) in [("X", "Y1"), ("X", "Y2"), ("Y1", "Y3")] {
        let n = node("MatMul", format!("mm_{y}"), &[a, "W"], &[y]);
        put_message(GRAPH_NODE, &n.encode_to_vec(), &mut graph);
    }
    put_message(
        GRAPH_INITIALIZER,
        &fp32("W", &[2, 2], &[1.0, -2.0, 3.0, 0.5]),
        &mut graph,
    );
    let mut model = Vec::new();
    put_message(MODEL_GRAPH, &graph, &mut model);
    let opset = OperatorSetIdProto {
        domain: "ai.onnx".into(),
        version: 13,
    };
    put_message(MODEL_OPSET_IMPORT, &opset.encode_to_vec(), &mut model);
    let q = quantize_int8(&model).unwrap();
    assert_eq!((q.matmuls, q.weights), (3, 1));
    let parsed = parse(&q.bytes);
    let count = |op: &str| parsed.nodes.iter().filter(|n| n.op_type == op).count();
    // X is quantised once for its two products; Y1 once for its own.
    assert_eq!(count("DynamicQuantizeLinear"), 2);
    assert_eq!(count("MatMulInteger"), 3);
    let mut names: Vec<&String> = parsed.initializers.keys().collect();
    names.sort();
    assert_eq!(names, ["W.int8", "W.int8_scale", "W.int8_zero"]);
}

#[test]
fn non_finite_weights_and_wrong_lengths_are_named() {
    let e = quantize_columns(&[1.0, f32::NAN, 0.0, 2.0], 2, 2)
        .unwrap_err()
        .to_string();
    assert!(e.contains("NaN") && e.contains("[0, 1]"), "{e}");
    let e = quantize_columns(&[1.0; 5], 2, 2).unwrap_err().to_string();
    assert!(e.contains("5 values"), "{e}");
}

proptest! {
    /// Every weight comes back within half its column's step; the largest of each column maps
    /// to ±127; a column of zeros gets scale 1 and zeros.
    #[test]
    fn quantised_columns_stay_within_half_a_step(
        k in 1usize..6,
        n in 1usize..6,
        seed in proptest::collection::vec(-1000.0f32..1000.0, 36),
        zero_col in proptest::option::of(0usize..6),
    ) {
        let mut w: Vec<f32> = seed[..k * n].to_vec();
        if let Some(c) = zero_col.filter(|c| *c < n) {
            for r in 0..k {
                w[r * n + c] = 0.0;
            }
        }
        let (q, scale) = quantize_columns(&w, k, n).unwrap();
        prop_assert_eq!(q.len(), k * n);
        for c in 0..n {
            let col: Vec<f32> = (0..k).map(|r| w[r * n + c]).collect();
            let max = col.iter().fold(0f32, |m, v| m.max(v.abs()));
            if max == 0.0 {
                prop_assert_eq!(scale[c], 1.0);
            } else {
                prop_assert!((scale[c] - max / 127.0).abs() <= f32::EPSILON * max);
                prop_assert!((0..k).any(|r| q[r * n + c].unsigned_abs() == 127));
            }
            for r in 0..k {
                let v = q[r * n + c];
                prop_assert!(v != i8::MIN);
                let back = f32::from(v) * scale[c];
                prop_assert!((back - w[r * n + c]).abs() <= scale[c] * 0.5001);
            }
        }
    }
}

#[test]
fn accuracy_texts_run_from_short_phrases_to_long_passages() {
    let texts = accuracy_texts();
    assert_eq!(texts.len(), ACCURACY_SENTENCES.len() + 3);
    let words = |t: &String| t.split_whitespace().count();
    assert!(texts.iter().any(|t| words(t) <= 1));
    assert!(texts.iter().map(words).max().unwrap() > 200);
}
