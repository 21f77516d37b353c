//! **A FAKE GPU probe, for tests only** (feature `fake-probe`; this crate's own tests turn it on
//! through a dev-dependency on the crate itself). Never part of a release build: nothing in the
//! coordinator can construct it. Its devices are marked `simulated: true`, named "Fake GPU" with
//! uuids `GPU-fake-<index>`, and the probe calls itself `scripted (fake)`, so a snapshot taken
//! through it can never pass for real hardware.

use std::collections::VecDeque;

use parking_lot::Mutex;

use crate::error::ProbeError;
use crate::probe::GpuProbe;
use crate::types::GpuInfo;

/// One step of a [`ScriptedProbe`]'s script: what one call of `sample` answers.
#[derive(Clone, Debug)]
pub enum ScriptStep {
    /// Report these devices (each may be healthy, lost, or carry unsupported fields).
    Report(Vec<GpuInfo>),
    /// Fail as a whole with this error.
    Fail(ProbeError),
}

/// **A fake for tests**, not a real probe: it plays back a script of steps, one per call of
/// `sample` — report these GPUs, then fail as if the library went missing, then report GPU 1
/// lost, and so on. After the last step it repeats the last one. An empty script reports no
/// GPUs. Its name is `scripted (fake)`.
pub struct ScriptedProbe {
    state: Mutex<ScriptState>,
}

struct ScriptState {
    steps: VecDeque<ScriptStep>,
    last: ScriptStep,
    calls: u64,
}

impl ScriptedProbe {
    /// A fake that plays back `steps` in order.
    pub fn new(steps: impl IntoIterator<Item = ScriptStep>) -> Self {
        ScriptedProbe {
            state: Mutex::new(ScriptState {
                steps: steps.into_iter().collect(),
                last: ScriptStep::Report(Vec::new()),
                calls: 0,
            }),
        }
    }

    /// Appends a step to the script.
    pub fn push(&self, step: ScriptStep) {
        self.state.lock().steps.push_back(step);
    }

    /// How many times `sample` has been called.
    pub fn calls(&self) -> u64 {
        self.state.lock().calls
    }

    /// A healthy fake device: uuid `GPU-fake-<index>`, name "Fake GPU", marked simulated, the
    /// given memory with 1 GiB used (or all of it if less), every reading present.
    pub fn gpu(index: u32, memory_total_bytes: u64) -> GpuInfo {
        let used = memory_total_bytes.min(1 << 30);
        GpuInfo {
            index,
            uuid: format!("GPU-fake-{index}"),
            name: "Fake GPU".to_string(),
            memory_total_bytes,
            memory_used_bytes: used,
            memory_free_bytes: memory_total_bytes - used,
            utilization_gpu_percent: Some(10),
            utilization_memory_percent: Some(5),
            temperature_celsius: Some(40),
            power_draw_milliwatts: Some(100_000),
            power_limit_milliwatts: Some(700_000),
            energy_millijoules: Some(1_000_000),
            processes: Vec::new(),
            // No hardware behind it: consumers that tell simulated devices apart (the DCGM
            // labels on /metrics, `veraltheim gpus`) must never show it as a real GPU.
            simulated: true,
            lost: false,
            errors: Vec::new(),
        }
    }
}

impl GpuProbe for ScriptedProbe {
    fn name(&self) -> &str {
        "scripted (fake)"
    }

    fn sample(&self) -> Result<Vec<GpuInfo>, ProbeError> {
        let mut st = self.state.lock();
        st.calls += 1;
        if let Some(step) = st.steps.pop_front() {
            st.last = step;
        }
        match &st.last {
            ScriptStep::Report(gpus) => Ok(gpus.clone()),
            ScriptStep::Fail(e) => Err(e.clone()),
        }
    }
}
