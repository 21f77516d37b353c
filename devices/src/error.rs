use thiserror::Error;

/// What can go wrong with a GPU probe, a simulate spec or simulated memory accounting.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ProbeError {
    /// The probe cannot work on this machine at all (no NVIDIA library or driver). Callers
    /// report "no GPUs" and carry on.
    #[error("GPU probe unavailable: {0}")]
    Unavailable(String),

    /// A probe that was working failed as a whole for this sample.
    #[error("GPU probe failed: {0}")]
    Failed(String),

    /// A simulate spec such as `2x80GiB` could not be parsed.
    #[error("invalid GPU simulation spec `{spec}`: {reason}")]
    BadSpec {
        /// The spec as given.
        spec: String,
        /// Which part is wrong and what was expected.
        reason: String,
    },

    /// A simulated-device operation named a device that does not exist.
    #[error("no simulated GPU {index} (there are {count})")]
    NoSuchDevice {
        /// The index asked for.
        index: u32,
        /// How many simulated devices there are.
        count: u32,
    },

    /// Charging would take a simulated device past its memory.
    #[error(
        "simulated GPU {index} ({uuid}) cannot take {requested} bytes: {free} of {total} bytes free"
    )]
    OverCharge {
        /// The device's index.
        index: u32,
        /// The device's uuid.
        uuid: String,
        /// Bytes asked for.
        requested: u64,
        /// Bytes free before the request.
        free: u64,
        /// The device's total memory.
        total: u64,
    },

    /// Releasing more than was charged to a simulated device (an accounting bug in the caller).
    #[error("simulated GPU {index} ({uuid}) cannot release {requested} bytes: only {used} charged")]
    OverRelease {
        /// The device's index.
        index: u32,
        /// The device's uuid.
        uuid: String,
        /// Bytes asked to release.
        requested: u64,
        /// Bytes charged at the time.
        used: u64,
    },
}
