//! Tensor element types, with their names in the KServe v2 protocol (`"FP32"`) and in Triton model
//! configurations (`"TYPE_FP32"`).

use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataType {
    Bool,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
    Int8,
    Int16,
    Int32,
    Int64,
    Fp16,
    Fp32,
    Fp64,
    /// Variable-length byte strings.
    Bytes,
    Bf16,
}

const ALL: [(DataType, &str); 14] = [
    (DataType::Bool, "BOOL"),
    (DataType::Uint8, "UINT8"),
    (DataType::Uint16, "UINT16"),
    (DataType::Uint32, "UINT32"),
    (DataType::Uint64, "UINT64"),
    (DataType::Int8, "INT8"),
    (DataType::Int16, "INT16"),
    (DataType::Int32, "INT32"),
    (DataType::Int64, "INT64"),
    (DataType::Fp16, "FP16"),
    (DataType::Fp32, "FP32"),
    (DataType::Fp64, "FP64"),
    (DataType::Bytes, "BYTES"),
    (DataType::Bf16, "BF16"),
];

impl DataType {
    pub const ALL: [DataType; 14] = {
        let mut out = [DataType::Bool; 14];
        let mut i = 0;
        while i < 14 {
            out[i] = ALL[i].0;
            i += 1;
        }
        out
    };

    /// The KServe v2 name, e.g. `FP32`, `BYTES`.
    pub fn as_str(self) -> &'static str {
        ALL.iter()
            .find(|(d, _)| *d == self)
            .map(|(_, s)| *s)
            .unwrap_or("INVALID")
    }

    /// The Triton model-configuration name, e.g. `TYPE_FP32`; BYTES is `TYPE_STRING` there.
    pub fn config_name(self) -> String {
        match self {
            DataType::Bytes => "TYPE_STRING".to_string(),
            other => format!("TYPE_{}", other.as_str()),
        }
    }

    /// Parses a Triton model-configuration name (`TYPE_FP32`, `TYPE_STRING`).
    pub fn from_config_name(s: &str) -> Result<Self, UnknownDatatype> {
        match s.strip_prefix("TYPE_") {
            Some("STRING") => Ok(DataType::Bytes),
            Some(rest) if rest != "BYTES" => {
                rest.parse().map_err(|_| UnknownDatatype(s.to_string()))
            }
            _ => Err(UnknownDatatype(s.to_string())),
        }
    }

    /// The smallest and largest value of an integer type; `None` for the others.
    pub fn integer_range(self) -> Option<(i128, i128)> {
        Some(match self {
            DataType::Int8 => (i8::MIN.into(), i8::MAX.into()),
            DataType::Int16 => (i16::MIN.into(), i16::MAX.into()),
            DataType::Int32 => (i32::MIN.into(), i32::MAX.into()),
            DataType::Int64 => (i64::MIN.into(), i64::MAX.into()),
            DataType::Uint8 => (0, u8::MAX.into()),
            DataType::Uint16 => (0, u16::MAX.into()),
            DataType::Uint32 => (0, u32::MAX.into()),
            DataType::Uint64 => (0, u64::MAX.into()),
            _ => return None,
        })
    }

    /// Size of one element in bytes; `None` for BYTES, whose elements vary.
    pub fn element_size(self) -> Option<usize> {
        Some(match self {
            DataType::Bool | DataType::Uint8 | DataType::Int8 => 1,
            DataType::Uint16 | DataType::Int16 | DataType::Fp16 | DataType::Bf16 => 2,
            DataType::Uint32 | DataType::Int32 | DataType::Fp32 => 4,
            DataType::Uint64 | DataType::Int64 | DataType::Fp64 => 8,
            DataType::Bytes => return None,
        })
    }
}

/// A datatype name that is not one of Triton's (the name as given). Becomes
/// `Error::UnknownDatatype`; kept apart so that this module does not depend on the error module,
/// whose errors name datatypes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownDatatype(pub String);

impl FromStr for DataType {
    type Err = UnknownDatatype;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ALL.iter()
            .find(|(_, name)| *name == s)
            .map(|(d, _)| *d)
            .ok_or_else(|| UnknownDatatype(s.to_string()))
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in DataType::ALL {
            assert_eq!(d.as_str().parse::<DataType>().unwrap(), d);
            assert_eq!(DataType::from_config_name(&d.config_name()).unwrap(), d);
        }
        assert_eq!(DataType::Bytes.config_name(), "TYPE_STRING");
        assert!("FP33".parse::<DataType>().is_err());
        assert!(DataType::from_config_name("FP32").is_err());
        assert!(DataType::from_config_name("TYPE_BYTES").is_err());
    }
}
