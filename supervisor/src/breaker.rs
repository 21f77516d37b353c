//! A circuit breaker: stop calling what keeps failing, and probe it now and then.
//!
//! Closed: calls pass; `failure_threshold` consecutive failures open it. Open: calls are refused
//! at once with how long to wait; after the open time it becomes half-open. Half-open: exactly one
//! call (the probe) passes at a time; its success closes the breaker and resets the open time to
//! `base_open`, its failure opens it again for twice as long (at most `max_open`).
//!
//! Transitions are computed when the breaker is used (no timer task), from `tokio::time`, so the
//! breaker costs nothing while idle and tests drive it with the paused clock.

use std::{future::Future, time::Duration};

use parking_lot::Mutex;
use tokio::time::Instant;

/// When a [`CircuitBreaker`] opens and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures that open a closed breaker (at least 1).
    pub failure_threshold: u32,
    /// How long the breaker first stays open.
    pub base_open: Duration,
    /// The longest it stays open, however many probes fail.
    pub max_open: Duration,
}

impl BreakerConfig {
    /// A configuration; a zero threshold is taken as 1.
    pub fn new(failure_threshold: u32, base_open: Duration, max_open: Duration) -> Self {
        Self {
            failure_threshold: failure_threshold.max(1),
            base_open,
            max_open,
        }
    }
}

impl Default for BreakerConfig {
    /// 5 failures; open for 1 s, doubling up to 60 s.
    fn default() -> Self {
        Self::new(5, Duration::from_secs(1), Duration::from_secs(60))
    }
}

/// The breaker's state as seen from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls pass.
    Closed,
    /// Calls are refused.
    Open,
    /// One probe call at a time passes.
    HalfOpen,
}

/// Why [`CircuitBreaker::call`] did not return the call's own value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BreakerError<E> {
    /// The breaker is open; the call was not made.
    #[error("circuit breaker open; retry in {retry_after:?}")]
    Open {
        /// Time until the breaker lets a probe through.
        retry_after: Duration,
    },
    /// The breaker is half-open and its one probe is in flight; the call was not made.
    #[error("circuit breaker half-open with its probe in flight")]
    ProbeInFlight,
    /// The call was made and failed.
    #[error(transparent)]
    Inner(E),
}

#[derive(Debug, Clone, Copy)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant, open_for: Duration },
    HalfOpen { probing: bool, open_for: Duration },
}

#[derive(Debug)]
struct Inner {
    state: State,
    /// Bumped on every transition, so that a call admitted in an earlier state cannot move the
    /// breaker when it completes late.
    epoch: u64,
}

/// A circuit breaker shared by the callers of one dependency (wrap it in an `Arc`).
#[derive(Debug)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    inner: Mutex<Inner>,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config: BreakerConfig::new(config.failure_threshold, config.base_open, config.max_open),
            inner: Mutex::new(Inner {
                state: State::Closed { failures: 0 },
                epoch: 0,
            }),
        }
    }

    /// The state now (an open breaker whose time is up reads as half-open).
    pub fn state(&self) -> BreakerState {
        let mut inner = self.inner.lock();
        inner.refresh(Instant::now());
        match inner.state {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Makes the call `f()` if the breaker lets it through and records whether it succeeded.
    /// If the returned future is dropped mid-call, the call counts neither way (a probe's slot
    /// is freed for the next caller).
    pub async fn call<F, Fut, T, E>(&self, f: F) -> Result<T, BreakerError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut permit = self.admit()?;
        let result = f().await;
        permit.complete(result.is_ok());
        result.map_err(BreakerError::Inner)
    }

    fn admit<E>(&self) -> Result<Permit<'_>, BreakerError<E>> {
        let now = Instant::now();
        let mut inner = self.inner.lock();
        inner.refresh(now);
        let epoch = inner.epoch;
        match &mut inner.state {
            State::Closed { .. } => Ok(Permit::new(self, epoch)),
            State::Open { until, .. } => Err(BreakerError::Open {
                retry_after: until.saturating_duration_since(now),
            }),
            State::HalfOpen { probing: true, .. } => Err(BreakerError::ProbeInFlight),
            State::HalfOpen { probing, .. } => {
                *probing = true;
                Ok(Permit::new(self, epoch))
            }
        }
    }
}

impl Inner {
    fn refresh(&mut self, now: Instant) {
        if let State::Open { until, open_for } = self.state
            && now >= until
        {
            self.transition(State::HalfOpen {
                probing: false,
                open_for,
            });
        }
    }

    fn transition(&mut self, state: State) {
        tracing::debug!(from = ?self.state, to = ?state, "circuit breaker transition");
        self.state = state;
        self.epoch = self.epoch.wrapping_add(1);
    }

    fn open(&mut self, open_for: Duration) {
        self.transition(State::Open {
            until: Instant::now() + open_for,
            open_for,
        });
    }
}

struct Permit<'a> {
    breaker: &'a CircuitBreaker,
    epoch: u64,
    done: bool,
}

impl<'a> Permit<'a> {
    fn new(breaker: &'a CircuitBreaker, epoch: u64) -> Self {
        Self {
            breaker,
            epoch,
            done: false,
        }
    }

    fn complete(&mut self, success: bool) {
        self.done = true;
        let config = &self.breaker.config;
        let mut inner = self.breaker.inner.lock();
        if inner.epoch != self.epoch {
            return;
        }
        match (inner.state, success) {
            (State::Closed { .. }, true) => inner.state = State::Closed { failures: 0 },
            (State::Closed { failures }, false) => {
                let failures = failures.saturating_add(1);
                if failures >= config.failure_threshold {
                    inner.open(config.base_open);
                } else {
                    inner.state = State::Closed { failures };
                }
            }
            (State::HalfOpen { .. }, true) => inner.transition(State::Closed { failures: 0 }),
            (State::HalfOpen { open_for, .. }, false) => {
                inner.open(open_for.saturating_mul(2).min(config.max_open));
            }
            (State::Open { .. }, _) => {}
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut inner = self.breaker.inner.lock();
        if inner.epoch == self.epoch
            && let State::HalfOpen { probing, .. } = &mut inner.state
        {
            *probing = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::{sync::oneshot, time::sleep};

    use super::*;

    const BASE: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(5);

    fn breaker(threshold: u32) -> CircuitBreaker {
        CircuitBreaker::new(BreakerConfig::new(threshold, BASE, MAX))
    }

    async fn ok(b: &CircuitBreaker) -> Result<u32, BreakerError<&'static str>> {
        b.call(|| async { Ok(7) }).await
    }

    async fn fail(b: &CircuitBreaker) -> Result<u32, BreakerError<&'static str>> {
        b.call(|| async { Err("down") }).await
    }

    async fn trip(b: &CircuitBreaker, threshold: u32) {
        for _ in 0..threshold {
            assert_eq!(fail(b).await, Err(BreakerError::Inner("down")));
        }
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_only() {
        let b = breaker(3);
        fail(&b).await.ok();
        fail(&b).await.ok();
        assert_eq!(ok(&b).await, Ok(7), "a success resets the count");
        fail(&b).await.ok();
        fail(&b).await.ok();
        assert_eq!(b.state(), BreakerState::Closed);
        fail(&b).await.ok();
        assert_eq!(b.state(), BreakerState::Open);

        let called = std::sync::atomic::AtomicBool::new(false);
        let refused: Result<(), BreakerError<&str>> = b
            .call(|| async {
                called.store(true, std::sync::atomic::Ordering::SeqCst);
                Ok(())
            })
            .await;
        assert_eq!(refused, Err(BreakerError::Open { retry_after: BASE }));
        assert!(!called.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[tokio::test(start_paused = true)]
    async fn open_time_doubles_per_failed_probe_up_to_the_cap() {
        let b = breaker(2);
        trip(&b, 2).await;
        for expected in [BASE, 2 * BASE, 4 * BASE, MAX, MAX] {
            assert_eq!(
                ok(&b).await,
                Err(BreakerError::Open {
                    retry_after: expected
                })
            );
            sleep(expected - Duration::from_millis(1)).await;
            assert_eq!(b.state(), BreakerState::Open);
            sleep(Duration::from_millis(1)).await;
            assert_eq!(b.state(), BreakerState::HalfOpen);
            assert_eq!(fail(&b).await, Err(BreakerError::Inner("down")));
            assert_eq!(b.state(), BreakerState::Open);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn successful_probe_closes_and_resets_the_open_time() {
        let b = breaker(1);
        trip(&b, 1).await;
        sleep(BASE).await;
        fail(&b).await.ok();
        sleep(2 * BASE).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(ok(&b).await, Ok(7));
        assert_eq!(b.state(), BreakerState::Closed);
        trip(&b, 1).await;
        assert_eq!(ok(&b).await, Err(BreakerError::Open { retry_after: BASE }));
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_lets_one_probe_through_at_a_time() {
        let b = Arc::new(breaker(1));
        trip(&b, 1).await;
        sleep(BASE).await;

        let (release, gate) = oneshot::channel::<()>();
        let probe = tokio::spawn({
            let b = b.clone();
            async move {
                b.call(|| async move { gate.await.map(|()| 1).map_err(|_| "gate dropped") })
                    .await
            }
        });
        tokio::task::yield_now().await;
        assert_eq!(ok(&b).await, Err(BreakerError::ProbeInFlight));
        assert_eq!(b.state(), BreakerState::HalfOpen);

        release.send(()).ok();
        assert_eq!(probe.await.ok(), Some(Ok(1)));
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(ok(&b).await, Ok(7));
    }

    #[tokio::test(start_paused = true)]
    async fn abandoned_probe_frees_its_slot() {
        let b = breaker(1);
        trip(&b, 1).await;
        sleep(BASE).await;
        let stuck = b.call(std::future::pending::<Result<(), &str>>);
        let timed_out = tokio::time::timeout(Duration::from_millis(10), stuck).await;
        assert!(timed_out.is_err());
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(ok(&b).await, Ok(7));
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn late_results_from_an_earlier_state_are_ignored() {
        let b = Arc::new(breaker(1));
        let (release, gate) = oneshot::channel::<()>();
        let slow = tokio::spawn({
            let b = b.clone();
            async move {
                b.call(|| async move {
                    gate.await.ok();
                    Err::<(), _>("late")
                })
                .await
            }
        });
        tokio::task::yield_now().await;
        trip(&b, 1).await;
        sleep(BASE).await;
        assert_eq!(ok(&b).await, Ok(7));
        release.send(()).ok();
        assert_eq!(slow.await.ok(), Some(Err(BreakerError::Inner("late"))));
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "a failure admitted before the trip does not reopen the breaker"
        );
    }
}
