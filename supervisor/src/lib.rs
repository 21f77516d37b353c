//! Supervision trees for tokio tasks, after Erlang/OTP's `supervisor` behaviour, and the small
//! resilience kit that goes with them (a circuit breaker, [`breaker`]).
//!
//! A [`SupervisorSpec`] names its children ([`ChildSpec`]: a worker factory or a nested
//! supervisor), a restart [`Strategy`] and a restart intensity. [`SupervisorSpec::start`] starts
//! the children in order and returns a [`SupervisorHandle`]: snapshots of the tree, dynamic
//! children, chaos kills, shutdown. Semantics follow OTP's design principles (`sup_princ`):
//! one-for-one / one-for-all / rest-for-one, permanent / transient / temporary children, a sliding
//! restart window whose overflow stops the supervisor and escalates the failure to its parent.
//!
//! Invariants:
//! - This crate knows nothing of models, gRPC, the bus or configuration, and depends on no other
//!   Veraltheim crate; callers observe it through [`SupervisorHandle::snapshot`] and a plain
//!   event callback ([`SupervisorEvent`]).
//! - A supervisor is one tokio task that alone owns its children: every start, stop and restart
//!   of a child happens inside that task, so they never race each other.
//! - Children start in spec order and stop in reverse order, one at a time; a child is asked to
//!   stop through its [`CancellationToken`](tokio_util::sync::CancellationToken) and is aborted
//!   only when its [`Shutdown`] allows no more waiting.
//! - Aborting a supervisor's task aborts its whole subtree: no child outlives its supervisor.
//! - Time is only ever read and awaited through `tokio::time`, so tests run on the paused clock.
//! - Tokio cannot preempt: a child that blocks its thread without yielding cannot be aborted.
//!
//! ```
//! use std::time::Duration;
//! use veraltheim_supervisor::{ChildContext, ChildSpec, Restart, Strategy, SupervisorSpec};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), veraltheim_supervisor::Error> {
//! let handle = SupervisorSpec::new("System")
//!     .strategy(Strategy::OneForOne)
//!     .intensity(3, Duration::from_secs(5))
//!     .child(ChildSpec::worker("EventRouter", |ctx: ChildContext| async move {
//!         ctx.cancelled().await;
//!         Ok(())
//!     }))
//!     .child(ChildSpec::supervisor(
//!         SupervisorSpec::new("Models").strategy(Strategy::OneForOne),
//!     ))
//!     .start()
//!     .await?;
//!
//! // A worker per loaded model, added at runtime under the nested supervisor.
//! handle
//!     .supervisor("Models")?
//!     .start_child(
//!         ChildSpec::worker("model:minilm", |ctx: ChildContext| async move {
//!             ctx.cancelled().await;
//!             Ok(())
//!         })
//!         .restart(Restart::Transient),
//!     )
//!     .await?;
//! assert_eq!(handle.snapshot().find("Models/model:minilm").map(|n| n.restarts), Some(0));
//!
//! handle.shutdown().await?;
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod breaker;
mod error;
mod event;
mod handle;
mod snapshot;
mod spec;
mod supervisor;

pub use breaker::{BreakerConfig, BreakerError, BreakerState, CircuitBreaker};
pub use error::Error;
pub use event::{EventHook, Exit, SupervisorEvent};
pub use handle::SupervisorHandle;
pub use snapshot::{NodeKind, NodeSnapshot, NodeState};
pub use spec::{
    Backoff, BoxError, ChildContext, ChildSpec, Restart, Shutdown, Strategy, SupervisorSpec,
};
