//! A model's load state.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ModelState {
    NotLoaded,
    Loading,
    Ready,
    Unloading,
    Failed,
}

impl ModelState {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelState::NotLoaded => "NOT_LOADED",
            ModelState::Loading => "LOADING",
            ModelState::Ready => "READY",
            ModelState::Unloading => "UNLOADING",
            ModelState::Failed => "FAILED",
        }
    }

    /// The state word Triton's repository index uses (`READY`, `LOADING`, `UNLOADING`,
    /// `UNAVAILABLE`), so that tools written for Triton read it.
    pub fn triton_str(self) -> &'static str {
        match self {
            ModelState::Ready => "READY",
            ModelState::Loading => "LOADING",
            ModelState::Unloading => "UNLOADING",
            ModelState::NotLoaded | ModelState::Failed => "UNAVAILABLE",
        }
    }
}

impl fmt::Display for ModelState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
