//! The node's view of its models' latency objectives (issue 17): a worker of the
//! AICoordinatorSupervisor that reads every model's controller ([`veraltheim_fastpath::slo`])
//! every [`INTERVAL`] and
//!
//! - publishes `models.<name>.objective` on the bus when an objective becomes at risk and when it
//!   is kept again (with the controller's reason), so that `veraltheim events` and the NATS
//!   bridge see it; and
//! - tells the job side which models are at risk and on which GPUs they run (`on_risk`): the
//!   runner pauses the node's local command jobs while any objective is at risk (item 3), and GPU
//!   jobs on those GPUs (item 4).
//!
//! A model that is unloaded, or loses its objective by a reload, counts as no longer at risk.
//! [`Tracker`] holds the rule, without a clock or I/O; the worker only feeds it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use veraltheim_bus::{Bus, Event};
use veraltheim_models::allocator::DeviceId;
use veraltheim_serving::ModelManager;
use veraltheim_supervisor::{ChildContext, ChildSpec};

/// How often the objectives are read.
pub const INTERVAL: Duration = Duration::from_millis(200);

/// Told when a model's objective becomes at risk (`Some(why)`, with the GPUs it runs on) or is
/// kept again (`None`).
pub type RiskFn = Arc<dyn Fn(&str, Option<String>, Vec<u32>) + Send + Sync>;

/// One model's objective as the tracker sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub model: String,
    pub at_risk: bool,
    pub reason: String,
    pub gpus: Vec<u32>,
}

/// What changed since the last reading.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    AtRisk {
        model: String,
        why: String,
        gpus: Vec<u32>,
    },
    Kept {
        model: String,
    },
}

/// The models at risk at the last reading.
#[derive(Default)]
pub struct Tracker {
    at_risk: BTreeMap<String, (String, Vec<u32>)>,
}

impl Tracker {
    /// Compares a reading (every model with an objective) with the last one. A model at risk
    /// that is missing from the reading is kept again; one at risk whose GPUs changed is told
    /// again.
    pub fn update(&mut self, reading: &[Seen]) -> Vec<Change> {
        let mut changes = Vec::new();
        let mut now = BTreeMap::new();
        for s in reading.iter().filter(|s| s.at_risk) {
            let known = self.at_risk.get(&s.model);
            if known.is_none_or(|(_, gpus)| *gpus != s.gpus) {
                changes.push(Change::AtRisk {
                    model: s.model.clone(),
                    why: s.reason.clone(),
                    gpus: s.gpus.clone(),
                });
            }
            now.insert(s.model.clone(), (s.reason.clone(), s.gpus.clone()));
        }
        for model in self.at_risk.keys() {
            if !now.contains_key(model) {
                changes.push(Change::Kept {
                    model: model.clone(),
                });
            }
        }
        self.at_risk = now;
        changes
    }
}

/// Every loaded model's objective now.
fn read(models: &ModelManager) -> Vec<Seen> {
    models
        .workers()
        .iter()
        .filter_map(|w| {
            let o = w.slo()?;
            let gpus = models
                .memory_of(w.name())
                .into_iter()
                .filter_map(|(device, _)| match device {
                    DeviceId::Gpu(i) => Some(i),
                    DeviceId::Cpu => None,
                })
                .collect();
            Some(Seen {
                model: w.name().to_string(),
                at_risk: o.at_risk,
                reason: o.reason,
                gpus,
            })
        })
        .collect()
}

/// The worker (see the module documentation).
pub fn watcher(models: Arc<ModelManager>, bus: Bus, on_risk: RiskFn) -> ChildSpec {
    ChildSpec::worker("ObjectiveWatch", move |ctx: ChildContext| {
        let (models, bus, on_risk) = (models.clone(), bus.clone(), on_risk.clone());
        async move {
            let mut tracker = Tracker::default();
            loop {
                for change in tracker.update(&read(&models)) {
                    let (model, event) = match change {
                        Change::AtRisk { model, why, gpus } => {
                            on_risk(&model, Some(why.clone()), gpus);
                            let event = Event::new(
                                format!("models.{model}.objective"),
                                format!("the latency objective of {model} is at risk: {why}"),
                            )
                            .with_attribute("at_risk", "true");
                            (model, event)
                        }
                        Change::Kept { model } => {
                            on_risk(&model, None, Vec::new());
                            let event = Event::new(
                                format!("models.{model}.objective"),
                                format!("the latency objective of {model} is kept again"),
                            )
                            .with_attribute("at_risk", "false");
                            (model, event)
                        }
                    };
                    if let Err(e) = bus.publish(event).await {
                        tracing::debug!(%model, error = %e, "objective event not published");
                    }
                }
                tokio::select! {
                    _ = ctx.cancelled() => {
                        // Nothing is at risk once this node stops watching: never leave jobs
                        // paused for a watcher that is gone.
                        for change in tracker.update(&[]) {
                            if let Change::Kept { model } = change {
                                on_risk(&model, None, Vec::new());
                            }
                        }
                        return Ok(());
                    }
                    _ = tokio::time::sleep(INTERVAL) => {}
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(model: &str, at_risk: bool, gpus: &[u32]) -> Seen {
        Seen {
            model: model.into(),
            at_risk,
            reason: format!("{model} reason"),
            gpus: gpus.to_vec(),
        }
    }

    #[test]
    fn tells_each_transition_once() {
        let mut t = Tracker::default();
        assert!(t.update(&[seen("a", false, &[])]).is_empty());
        assert_eq!(
            t.update(&[seen("a", true, &[0])]),
            vec![Change::AtRisk {
                model: "a".into(),
                why: "a reason".into(),
                gpus: vec![0]
            }]
        );
        // Still at risk: nothing new; on other GPUs: told again.
        assert!(t.update(&[seen("a", true, &[0])]).is_empty());
        assert_eq!(t.update(&[seen("a", true, &[1])]).len(), 1);
        assert_eq!(
            t.update(&[seen("a", false, &[1])]),
            vec![Change::Kept { model: "a".into() }]
        );
    }

    #[test]
    fn a_model_that_goes_away_is_kept_again() {
        let mut t = Tracker::default();
        t.update(&[seen("a", true, &[]), seen("b", true, &[])]);
        assert_eq!(
            t.update(&[seen("b", true, &[])]),
            vec![Change::Kept { model: "a".into() }]
        );
        assert_eq!(t.update(&[]), vec![Change::Kept { model: "b".into() }]);
    }
}
