//! KServe request parameters, read the one way every caller needs them (the request's
//! `priority` and `timeout`, a shared-memory input's offset and size).

use tonic::Status;
use veraltheim_proto::inference as kserve;

/// A KServe parameter that must be a non-negative integer (int64 or uint64 on the wire).
pub fn unsigned_param(name: &str, p: &kserve::InferParameter) -> Result<u64, Status> {
    match p.parameter_choice {
        Some(kserve::infer_parameter::ParameterChoice::Uint64Param(v)) => Ok(v),
        Some(kserve::infer_parameter::ParameterChoice::Int64Param(v)) if v >= 0 => Ok(v as u64),
        _ => Err(Status::invalid_argument(format!(
            "parameter '{name}' must be a non-negative integer"
        ))),
    }
}
