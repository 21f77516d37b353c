//! ONNX Runtime sessions: one per instance of a model, opened from the graph file, and the pool
//! that lends one to each batch.

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError, TryLockError};

use ort::session::{HasSelectedOutputs, OutputSelector, RunOptions, Session};

use super::optimize::Level;
use super::runtime::Runtime;
use crate::error::Error;

/// How to open a session: the graph file, the optimisation ONNX Runtime applies to it, its
/// intra-op threads (0: ONNX Runtime's default, one per core) and, when given, where ONNX Runtime
/// writes the graph it optimised and, when given, the prefix of the profile ONNX Runtime's
/// profiler writes ([`super::profile`]).
#[derive(Clone, Debug)]
pub(super) struct Spec<'a> {
    pub(super) file: &'a Path,
    pub(super) level: Level,
    pub(super) intra_op_threads: usize,
    pub(super) save_optimized: Option<&'a Path>,
    pub(super) profile: Option<&'a Path>,
}

pub(super) fn open_session(rt: &Runtime, model: &str, spec: &Spec<'_>) -> Result<Session, Error> {
    let file = spec.file;
    let fail = |e: &dyn fmt::Display| {
        Error::load(
            model,
            format!("ONNX Runtime cannot open '{}': {e}", file.display()),
        )
    };
    let mut builder = Session::builder(&rt.env)
        .map_err(|e| fail(&e))?
        .with_optimization_level(spec.level.ort())
        .map_err(|e| fail(&e))?;
    if spec.intra_op_threads > 0 {
        builder = builder
            .with_intra_threads(spec.intra_op_threads)
            .map_err(|e| fail(&e))?;
    }
    if let Some(out) = spec.save_optimized {
        builder = builder
            .with_optimized_model_path(out)
            .map_err(|e| fail(&e))?;
    }
    if let Some(prefix) = spec.profile {
        builder = builder.with_profiling(prefix).map_err(|e| fail(&e))?;
    }
    builder.commit_from_file(file).map_err(|e| fail(&e))
}

pub(super) fn open_sessions(
    rt: &Runtime,
    model: &str,
    spec: &Spec<'_>,
    count: usize,
) -> Result<Vec<Session>, Error> {
    let spec = Spec {
        save_optimized: None,
        ..spec.clone()
    };
    (0..count.max(1))
        .map(|_| open_session(rt, model, &spec))
        .collect()
}

/// The sessions of one model, one per instance, each taken by one batch at a time.
pub(super) struct SessionPool {
    slots: Vec<Mutex<Slot>>,
    next: AtomicUsize,
}

pub(super) struct Slot {
    pub(super) session: Session,
    /// Selects the outputs to compute (ONNX Runtime prunes the rest of the graph).
    pub(super) run_options: RunOptions<HasSelectedOutputs>,
}

impl SessionPool {
    pub(super) fn new<'a>(
        model: &str,
        sessions: Vec<Session>,
        outputs: impl Iterator<Item = &'a str> + Clone,
    ) -> Result<SessionPool, Error> {
        let slots = sessions
            .into_iter()
            .map(|session| {
                let selector = outputs
                    .clone()
                    .fold(OutputSelector::no_default(), |s, name| s.with(name));
                let run_options = RunOptions::new()
                    .map_err(|e| Error::load(model, format!("ONNX Runtime: {e}")))?
                    .with_outputs(selector);
                Ok(Mutex::new(Slot {
                    session,
                    run_options,
                }))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(SessionPool {
            slots,
            next: AtomicUsize::new(0),
        })
    }

    /// The sessions back, in slot order.
    pub(super) fn into_sessions(self) -> Vec<Session> {
        self.slots
            .into_iter()
            .map(|m| {
                m.into_inner()
                    .unwrap_or_else(PoisonError::into_inner)
                    .session
            })
            .collect()
    }

    pub(super) fn len(&self) -> usize {
        self.slots.len()
    }

    /// Runs `f` on a free session, or waits for one (starting from a rotating slot so that
    /// concurrent batches spread over the instances).
    pub(super) fn with<R>(&self, f: impl FnOnce(&mut Slot) -> R) -> R {
        let n = self.slots.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        for i in 0..n {
            match self.slots[(start + i) % n].try_lock() {
                Ok(mut slot) => return f(&mut slot),
                // A panic while running leaves the session itself intact; keep using it.
                Err(TryLockError::Poisoned(p)) => return f(&mut p.into_inner()),
                Err(TryLockError::WouldBlock) => {}
            }
        }
        let mut slot = self.slots[start]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        f(&mut slot)
    }
}
