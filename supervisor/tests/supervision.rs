//! OTP supervision semantics, driven on tokio's paused clock. Workers write what they do to a
//! shared log; tests assert on the exact order of starts and stops, counts and states.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use parking_lot::Mutex;
use tokio::{
    sync::Notify,
    time::{Instant, sleep},
};
use veraltheim_supervisor::{
    Backoff, BoxError, ChildContext, ChildSpec, Error, Exit, NodeKind, NodeSnapshot, NodeState,
    Restart, Shutdown, Strategy, SupervisorEvent, SupervisorHandle, SupervisorSpec,
};

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn push(&self, entry: impl Into<String>) {
        self.0.lock().push(entry.into());
    }

    /// Everything logged since the last `take`.
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock())
    }

    fn count(&self, entry: &str) -> usize {
        self.0.lock().iter().filter(|e| *e == entry).count()
    }
}

#[derive(Clone, Default)]
struct Events(Arc<Mutex<Vec<SupervisorEvent>>>);

impl Events {
    fn hook(&self) -> impl Fn(SupervisorEvent) + Send + Sync + 'static {
        let events = self.0.clone();
        move |event| events.lock().push(event)
    }

    fn all(&self) -> Vec<SupervisorEvent> {
        self.0.lock().clone()
    }

    fn exits(&self) -> Vec<(String, Exit)> {
        self.all()
            .into_iter()
            .filter_map(|e| match e {
                SupervisorEvent::ChildExited { child, exit, .. } => Some((child, exit)),
                _ => None,
            })
            .collect()
    }
}

/// Lets every task run until all wait on something (the paused clock advances only then).
async fn settle() {
    sleep(Duration::from_millis(1)).await;
}

/// Logs `start`, runs until cancelled, logs `stop`.
fn steady(log: &Log, name: &'static str) -> ChildSpec {
    let log = log.clone();
    ChildSpec::worker(name, move |ctx: ChildContext| {
        let log = log.clone();
        async move {
            log.push(format!("start {name}"));
            ctx.cancelled().await;
            log.push(format!("stop {name}"));
            Ok(())
        }
    })
}

/// Like `steady`, but fails with `<name> failed` each time the trigger is notified.
fn triggered(log: &Log, name: &'static str, trigger: &Arc<Notify>) -> ChildSpec {
    let (log, trigger) = (log.clone(), trigger.clone());
    ChildSpec::worker(name, move |ctx: ChildContext| {
        let (log, trigger) = (log.clone(), trigger.clone());
        async move {
            log.push(format!("start {name}"));
            tokio::select! {
                () = ctx.cancelled() => {
                    log.push(format!("stop {name}"));
                    Ok(())
                }
                () = trigger.notified() => {
                    log.push(format!("fail {name}"));
                    Err(format!("{name} failed").into())
                }
            }
        }
    })
}

#[derive(Clone, Copy, Debug)]
enum Outcome {
    Ok,
    Err,
    Panic,
}

/// The first `n` incarnations end at once with `outcome`; later ones run like `steady`.
fn ends_first(log: &Log, name: &'static str, n: u32, outcome: Outcome) -> ChildSpec {
    let log = log.clone();
    let runs = Arc::new(AtomicU32::new(0));
    ChildSpec::worker(name, move |ctx: ChildContext| {
        let log = log.clone();
        let run = runs.fetch_add(1, Ordering::SeqCst);
        async move {
            log.push(format!("start {name}"));
            if run < n {
                return match outcome {
                    Outcome::Ok => Ok(()),
                    Outcome::Err => Err(BoxError::from(format!("{name} broke"))),
                    Outcome::Panic => panic!("kaboom in {name}"),
                };
            }
            ctx.cancelled().await;
            log.push(format!("stop {name}"));
            Ok(())
        }
    })
}

fn always_fails(log: &Log, name: &'static str) -> ChildSpec {
    ends_first(log, name, u32::MAX, Outcome::Err)
}

/// Writes to the log when its task is dropped, which is how an aborted task ends.
struct DropGuard(Log, String);

impl Drop for DropGuard {
    fn drop(&mut self) {
        self.0.push(format!("dropped {}", self.1));
    }
}

/// Like `steady`, and also logs `dropped` when its task ends (aborted tasks log only that).
fn guarded(log: &Log, name: &'static str) -> ChildSpec {
    let log = log.clone();
    ChildSpec::worker(name, move |ctx: ChildContext| {
        let log = log.clone();
        async move {
            let _guard = DropGuard(log.clone(), name.to_owned());
            log.push(format!("start {name}"));
            ctx.cancelled().await;
            log.push(format!("stop {name}"));
            Ok(())
        }
    })
}

/// Logs `start`, then never returns, cancelled or not.
fn stubborn(log: &Log, name: &'static str) -> ChildSpec {
    let log = log.clone();
    ChildSpec::worker(name, move |_ctx: ChildContext| {
        let log = log.clone();
        async move {
            let _guard = DropGuard(log.clone(), name.to_owned());
            log.push(format!("start {name}"));
            std::future::pending::<()>().await;
            Ok(())
        }
    })
}

/// How the supervisor ended; if it never does, the test fails instead of hanging.
async fn ended(handle: &SupervisorHandle) -> Result<(), Error> {
    tokio::time::timeout(secs(3600), handle.wait())
        .await
        .expect("the supervisor should have terminated")
}

fn node<'a>(snapshot: &'a NodeSnapshot, path: &str) -> &'a NodeSnapshot {
    snapshot
        .find(path)
        .unwrap_or_else(|| panic!("no node `{path}` in {snapshot:#?}"))
}

fn restarts(handle: &SupervisorHandle, names: &[&str]) -> Vec<u32> {
    let snapshot = handle.snapshot();
    names.iter().map(|n| node(&snapshot, n).restarts).collect()
}

async fn three_children(strategy: Strategy, log: &Log, trigger: &Arc<Notify>) -> SupervisorHandle {
    let handle = SupervisorSpec::new("root")
        .strategy(strategy)
        .intensity(5, secs(10))
        .child(steady(log, "a"))
        .child(triggered(log, "b", trigger))
        .child(steady(log, "c"))
        .start()
        .await
        .expect("tree starts");
    settle().await;
    assert_eq!(log.take(), ["start a", "start b", "start c"]);
    handle
}

#[tokio::test(start_paused = true)]
async fn one_for_one_restarts_only_the_failed_child() {
    let (log, trigger, events) = (Log::default(), Arc::new(Notify::new()), Events::default());
    let handle = SupervisorSpec::new("root")
        .intensity(5, secs(10))
        .on_event(events.hook())
        .child(steady(&log, "a"))
        .child(triggered(&log, "b", &trigger))
        .child(steady(&log, "c"))
        .start()
        .await
        .expect("tree starts");
    settle().await;
    assert_eq!(log.take(), ["start a", "start b", "start c"]);

    trigger.notify_one();
    settle().await;
    assert_eq!(log.take(), ["fail b", "start b"]);
    assert_eq!(restarts(&handle, &["a", "b", "c"]), [0, 1, 0]);
    let snapshot = handle.snapshot();
    assert_eq!(
        node(&snapshot, "b").last_failure.as_deref(),
        Some("b failed")
    );
    assert_eq!(node(&snapshot, "a").last_failure, None);
    assert!(
        snapshot
            .children
            .iter()
            .all(|c| c.state == NodeState::Running)
    );

    let b_events: Vec<_> = events
        .all()
        .into_iter()
        .filter(|e| match e {
            SupervisorEvent::ChildStarted { child, .. }
            | SupervisorEvent::ChildRestarted { child, .. }
            | SupervisorEvent::ChildExited { child, .. } => child == "b",
            _ => false,
        })
        .collect();
    let root = || "root".to_owned();
    let b = || "b".to_owned();
    assert_eq!(
        b_events,
        [
            SupervisorEvent::ChildStarted {
                supervisor: root(),
                child: b()
            },
            SupervisorEvent::ChildExited {
                supervisor: root(),
                child: b(),
                exit: Exit::Failed("b failed".to_owned()),
            },
            SupervisorEvent::ChildRestarted {
                supervisor: root(),
                child: b(),
                restarts: 1
            },
        ]
    );

    handle.shutdown().await.expect("clean shutdown");
    assert_eq!(log.take(), ["stop c", "stop b", "stop a"]);
    assert_eq!(handle.snapshot().state, NodeState::Stopped);
}

#[tokio::test(start_paused = true)]
async fn one_for_all_stops_the_others_in_reverse_and_restarts_all_in_order() {
    let (log, trigger) = (Log::default(), Arc::new(Notify::new()));
    let handle = three_children(Strategy::OneForAll, &log, &trigger).await;

    trigger.notify_one();
    settle().await;
    assert_eq!(
        log.take(),
        [
            "fail b", "stop c", "stop a", "start a", "start b", "start c"
        ]
    );
    assert_eq!(restarts(&handle, &["a", "b", "c"]), [1, 1, 1]);
    let snapshot = handle.snapshot();
    assert_eq!(
        node(&snapshot, "a").last_failure,
        None,
        "a was stopped, not failed"
    );
    assert_eq!(
        node(&snapshot, "b").last_failure.as_deref(),
        Some("b failed")
    );
}

#[tokio::test(start_paused = true)]
async fn rest_for_one_restarts_the_failed_child_and_those_after_it() {
    let (log, trigger) = (Log::default(), Arc::new(Notify::new()));
    let handle = SupervisorSpec::new("root")
        .strategy(Strategy::RestForOne)
        .intensity(5, secs(10))
        .child(steady(&log, "a"))
        .child(triggered(&log, "b", &trigger))
        .child(steady(&log, "c"))
        .child(steady(&log, "d"))
        .start()
        .await
        .expect("tree starts");
    settle().await;
    log.take();

    trigger.notify_one();
    settle().await;
    assert_eq!(
        log.take(),
        [
            "fail b", "stop d", "stop c", "start b", "start c", "start d"
        ]
    );
    assert_eq!(restarts(&handle, &["a", "b", "c", "d"]), [0, 1, 1, 1]);
}

#[tokio::test(start_paused = true)]
async fn restart_types_decide_on_normal_and_abnormal_exits() {
    use Outcome::*;
    use Restart::*;
    // (restart type, how the first run ends, restarted?, state afterwards or None if forgotten)
    let cases = [
        (Permanent, Ok, true, Some(NodeState::Running)),
        (Permanent, Err, true, Some(NodeState::Running)),
        (Transient, Ok, false, Some(NodeState::Stopped)),
        (Transient, Err, true, Some(NodeState::Running)),
        (Transient, Panic, true, Some(NodeState::Running)),
        (Temporary, Ok, false, None),
        (Temporary, Err, false, None),
        (Temporary, Panic, false, None),
    ];
    for (restart, outcome, restarted, state) in cases {
        let log = Log::default();
        let handle = SupervisorSpec::new("root")
            .intensity(5, secs(10))
            .child(steady(&log, "sibling"))
            .child(ends_first(&log, "w", 1, outcome).restart(restart))
            .start()
            .await
            .expect("tree starts");
        settle().await;
        let case = format!("{restart:?} after {outcome:?}");
        let expected_starts = if restarted { 2 } else { 1 };
        assert_eq!(log.count("start w"), expected_starts, "{case}");
        let snapshot = handle.snapshot();
        assert_eq!(snapshot.find("w").map(|w| w.state), state, "{case}");
        assert_eq!(node(&snapshot, "sibling").restarts, 0, "{case}");
        assert_eq!(log.count("start sibling"), 1, "{case}");
        handle.shutdown().await.expect("clean shutdown");
    }
}

#[tokio::test(start_paused = true)]
async fn exceeding_intensity_stops_children_in_reverse_and_fails_the_supervisor() {
    let (log, events) = (Log::default(), Events::default());
    let handle = SupervisorSpec::new("root")
        .intensity(3, secs(10))
        .on_event(events.hook())
        .child(steady(&log, "a"))
        .child(always_fails(&log, "b"))
        .child(steady(&log, "c"))
        .start()
        .await
        .expect("tree starts");

    let result = ended(&handle).await;
    match result {
        Err(Error::IntensityExceeded {
            supervisor,
            max_restarts: 3,
            child,
            ..
        }) => assert_eq!((supervisor.as_str(), child.as_str()), ("root", "b")),
        other => panic!("expected IntensityExceeded, got {other:?}"),
    }
    assert_eq!(
        log.take(),
        [
            "start a", "start b", "start c", "start b", "start b", "start b", "stop c", "stop a"
        ],
        "three restarts are allowed, the fourth failure stops the rest in reverse"
    );
    let snapshot = handle.snapshot();
    assert_eq!(snapshot.state, NodeState::Failed);
    assert!(
        snapshot
            .last_failure
            .as_deref()
            .is_some_and(|f| f.contains("restart intensity")),
        "{snapshot:?}"
    );
    let states: Vec<_> = snapshot.children.iter().map(|c| c.state).collect();
    assert_eq!(
        states,
        [NodeState::Stopped, NodeState::Failed, NodeState::Stopped]
    );
    assert!(events.all().iter().any(
        |e| matches!(e, SupervisorEvent::Escalated { supervisor, .. } if supervisor == "root")
    ));
    assert!(handle.is_terminated());
    assert!(matches!(
        handle.start_child(steady(&log, "late")).await,
        Err(Error::Terminated { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn failures_spaced_beyond_the_period_never_trip_the_intensity() {
    let (log, trigger) = (Log::default(), Arc::new(Notify::new()));
    let handle = SupervisorSpec::new("root")
        .intensity(1, secs(5))
        .child(triggered(&log, "w", &trigger))
        .start()
        .await
        .expect("tree starts");
    for _ in 0..5 {
        settle().await;
        trigger.notify_one();
        sleep(secs(6)).await;
    }
    assert!(!handle.is_terminated());
    assert_eq!(restarts(&handle, &["w"]), [5]);

    trigger.notify_one();
    settle().await;
    trigger.notify_one();
    assert!(
        matches!(ended(&handle).await, Err(Error::IntensityExceeded { .. })),
        "two failures within 5 s exceed 1 restart per 5 s"
    );
}

#[tokio::test(start_paused = true)]
async fn the_restart_window_slides_rather_than_resets() {
    let (log, trigger) = (Log::default(), Arc::new(Notify::new()));
    let handle = SupervisorSpec::new("root")
        .intensity(2, secs(10))
        .child(triggered(&log, "w", &trigger))
        .start()
        .await
        .expect("tree starts");
    // Failures at about t = 0, 6, 12: never more than 2 within 10 s.
    for gap in [6, 6, 2] {
        settle().await;
        trigger.notify_one();
        sleep(secs(gap)).await;
    }
    assert!(
        !handle.is_terminated(),
        "restarts at 0, 6 and 12 s are allowed"
    );
    // t = 14: the restarts at 6, 12 and 14 fall within 10 s. A window reset every 10 s
    // (0-10, 10-20) would have allowed it.
    trigger.notify_one();
    assert!(matches!(
        ended(&handle).await,
        Err(Error::IntensityExceeded { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn escalation_lets_the_parent_restart_the_failed_supervisor_by_its_strategy() {
    let (log, events) = (Log::default(), Events::default());
    let inner = SupervisorSpec::new("Inner")
        .intensity(1, secs(60))
        .child(steady(&log, "inner-a"))
        .child(ends_first(&log, "flaky", 2, Outcome::Err));
    let handle = SupervisorSpec::new("root")
        .strategy(Strategy::OneForAll)
        .intensity(5, secs(60))
        .on_event(events.hook())
        .child(steady(&log, "sibling"))
        .child(ChildSpec::supervisor(inner))
        .start()
        .await
        .expect("tree starts");
    settle().await;

    assert_eq!(
        log.take(),
        [
            "start sibling",
            "start inner-a",
            "start flaky",
            // Inner restarts flaky once (its limit), then gives up when it fails again.
            "start flaky",
            "stop inner-a",
            // Root is one-for-all: the sibling goes too, then all start again in order.
            "stop sibling",
            "start sibling",
            "start inner-a",
            "start flaky",
        ]
    );
    let snapshot = handle.snapshot();
    let inner = node(&snapshot, "Inner");
    assert_eq!(
        (inner.kind, inner.state, inner.restarts),
        (NodeKind::Supervisor, NodeState::Running, 1)
    );
    assert!(
        inner
            .last_failure
            .as_deref()
            .is_some_and(|f| f.contains("restart intensity") && f.contains("flaky broke")),
        "{inner:?}"
    );
    assert_eq!(node(&snapshot, "sibling").restarts, 1);
    assert_eq!(
        node(&snapshot, "Inner/flaky").restarts,
        0,
        "a fresh incarnation of Inner"
    );
    assert_eq!(node(&snapshot, "Inner/flaky").state, NodeState::Running);
    assert!(!handle.is_terminated());

    let events = events.all();
    let escalated = events.iter().position(|e| {
        matches!(e, SupervisorEvent::Escalated { supervisor, .. } if supervisor == "root/Inner")
    });
    let restarted = events.iter().position(|e| {
        matches!(e, SupervisorEvent::ChildRestarted { supervisor, child, restarts: 1 }
            if supervisor == "root" && child == "Inner")
    });
    assert!(
        matches!((escalated, restarted), (Some(e), Some(r)) if e < r),
        "the nested supervisor inherits the hook and escalates before its parent restarts it: {events:#?}"
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_goes_in_reverse_order_with_each_childs_timeout() {
    let (log, events) = (Log::default(), Events::default());
    let handle = SupervisorSpec::new("root")
        .on_event(events.hook())
        .child(steady(&log, "a").shutdown(Shutdown::Timeout(secs(5))))
        .child(stubborn(&log, "stubborn").shutdown(Shutdown::Timeout(secs(2))))
        .child(steady(&log, "c").shutdown(Shutdown::Timeout(secs(5))))
        .child(guarded(&log, "brutal").shutdown(Shutdown::Brutal))
        .start()
        .await
        .expect("tree starts");
    settle().await;
    log.take();

    let began = Instant::now();
    handle.shutdown().await.expect("clean shutdown");
    assert_eq!(
        began.elapsed(),
        secs(2),
        "only the stubborn child's timeout costs time"
    );
    assert_eq!(
        log.take(),
        ["dropped brutal", "stop c", "dropped stubborn", "stop a"],
        "brutal is aborted without being asked; stubborn is aborted after its 2 s"
    );
    assert_eq!(
        events.exits(),
        [
            ("brutal".to_owned(), Exit::Aborted),
            ("c".to_owned(), Exit::Shutdown),
            ("stubborn".to_owned(), Exit::Aborted),
            ("a".to_owned(), Exit::Shutdown),
        ]
    );
    assert!(
        handle
            .snapshot()
            .children
            .iter()
            .all(|c| c.state == NodeState::Stopped && c.last_failure.is_none())
    );
}

#[tokio::test(start_paused = true)]
async fn a_panic_is_a_failure_with_its_message() {
    let (log, events) = (Log::default(), Events::default());
    let handle = SupervisorSpec::new("root")
        .on_event(events.hook())
        .child(ends_first(&log, "w", 1, Outcome::Panic))
        .start()
        .await
        .expect("tree starts");
    settle().await;

    assert_eq!(log.take(), ["start w", "start w"]);
    let snapshot = handle.snapshot();
    let w = node(&snapshot, "w");
    assert_eq!((w.state, w.restarts), (NodeState::Running, 1));
    assert_eq!(w.last_failure.as_deref(), Some("panicked: kaboom in w"));
    assert_eq!(
        events.exits(),
        [("w".to_owned(), Exit::Panicked("kaboom in w".to_owned()))]
    );
}

#[tokio::test(start_paused = true)]
async fn backoff_delays_restarts_exponentially_up_to_its_cap() {
    let starts = Arc::new(Mutex::new(Vec::new()));
    let worker = {
        let starts = starts.clone();
        ChildSpec::worker("w", move |_ctx: ChildContext| {
            starts.lock().push(Instant::now());
            async { Err(BoxError::from("down")) }
        })
    };
    let handle = SupervisorSpec::new("root")
        .intensity(100, secs(60))
        .child(worker.backoff(Backoff::exponential(secs(1), secs(4))))
        .start()
        .await
        .expect("tree starts");

    sleep(Duration::from_millis(11_500)).await;
    let starts = starts.lock().clone();
    let gaps: Vec<_> = starts.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(gaps, [secs(1), secs(2), secs(4), secs(4)]);
    let snapshot = handle.snapshot();
    assert_eq!(
        (node(&snapshot, "w").state, node(&snapshot, "w").restarts),
        (NodeState::Restarting, 4),
        "the supervisor answers while the child waits out its backoff"
    );
    handle
        .shutdown()
        .await
        .expect("clean shutdown during a backoff");
    assert_eq!(node(&handle.snapshot(), "w").state, NodeState::Stopped);
}

#[tokio::test(start_paused = true)]
async fn backoff_starts_over_once_a_child_has_run_long_enough() {
    let starts = Arc::new(Mutex::new(Vec::new()));
    let worker = {
        let starts = starts.clone();
        ChildSpec::worker("w", move |_ctx: ChildContext| {
            starts.lock().push(Instant::now());
            async {
                sleep(secs(10)).await;
                Err(BoxError::from("down after a while"))
            }
        })
    };
    let _handle = SupervisorSpec::new("root")
        .intensity(100, secs(60))
        .child(worker.backoff(Backoff::exponential(secs(1), secs(8)).reset_after(secs(5))))
        .start()
        .await
        .expect("tree starts");
    sleep(secs(40)).await;
    let starts = starts.lock().clone();
    let gaps: Vec<_> = starts.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(gaps, [secs(11), secs(11), secs(11)]);
}

#[tokio::test(start_paused = true)]
async fn dynamic_children_start_terminate_restart_and_delete() {
    let log = Log::default();
    let handle = SupervisorSpec::new("root")
        .intensity(5, secs(10))
        .child(steady(&log, "a"))
        .start()
        .await
        .expect("tree starts");

    handle
        .start_child(steady(&log, "m1"))
        .await
        .expect("m1 starts");
    settle().await;
    assert_eq!(log.take(), ["start a", "start m1"]);
    let names: Vec<_> = handle
        .snapshot()
        .children
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, ["a", "m1"]);

    assert!(matches!(
        handle.start_child(steady(&log, "m1")).await,
        Err(Error::AlreadyPresent { .. })
    ));
    assert!(matches!(
        handle.start_child(steady(&log, "x/y")).await,
        Err(Error::InvalidSpec { .. })
    ));
    assert!(matches!(
        handle.delete_child("m1").await,
        Err(Error::Running { .. })
    ));

    handle.terminate_child("m1").await.expect("m1 stops");
    settle().await;
    assert_eq!(
        log.take(),
        ["stop m1"],
        "a terminated child is not restarted"
    );
    assert_eq!(node(&handle.snapshot(), "m1").state, NodeState::Stopped);

    handle.restart_child("m1").await.expect("m1 restarts");
    settle().await;
    assert_eq!(log.take(), ["start m1"]);
    assert_eq!(node(&handle.snapshot(), "m1").state, NodeState::Running);
    assert!(matches!(
        handle.restart_child("m1").await,
        Err(Error::Running { .. })
    ));

    handle.terminate_child("m1").await.expect("m1 stops");
    assert_eq!(log.take(), ["stop m1"]);
    handle.delete_child("m1").await.expect("m1 is forgotten");
    assert!(handle.snapshot().find("m1").is_none());
    assert!(matches!(
        handle.delete_child("m1").await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        handle.terminate_child("nope").await,
        Err(Error::NotFound { .. })
    ));

    handle
        .start_child(steady(&log, "temp").restart(Restart::Temporary))
        .await
        .expect("temp starts");
    handle.terminate_child("temp").await.expect("temp stops");
    assert!(
        handle.snapshot().find("temp").is_none(),
        "temporary children are forgotten"
    );

    assert_eq!(restarts(&handle, &["a"]), [0]);
    assert_eq!(log.take(), ["start temp", "stop temp"]);
}

#[tokio::test(start_paused = true)]
async fn a_child_that_fails_to_start_is_not_kept() {
    let log = Log::default();
    let handle = SupervisorSpec::new("root")
        .start()
        .await
        .expect("empty tree starts");
    let refused = handle
        .start_child(
            ChildSpec::worker("bad", |_ctx: ChildContext| async {
                Err(BoxError::from("port in use"))
            })
            .ready_timeout(secs(1)),
        )
        .await;
    assert_eq!(
        refused,
        Err(Error::StartFailed {
            supervisor: "root".to_owned(),
            child: "bad".to_owned(),
            reason: "port in use".to_owned(),
        })
    );
    assert!(handle.snapshot().children.is_empty());

    let ready = ChildSpec::worker("ready", |ctx: ChildContext| async move {
        sleep(secs(3)).await;
        ctx.ready();
        ctx.cancelled().await;
        Ok(())
    });
    let began = Instant::now();
    handle
        .start_child(ready.ready_timeout(secs(5)))
        .await
        .expect("signals ready in time");
    assert_eq!(
        began.elapsed(),
        secs(3),
        "start_child waits for the ready signal"
    );
    assert_eq!(node(&handle.snapshot(), "ready").state, NodeState::Running);
    drop(log);
}

#[tokio::test(start_paused = true)]
async fn a_failed_child_start_fails_the_tree_start_and_stops_the_started_in_reverse() {
    let log = Log::default();
    let never_ready = {
        let log = log.clone();
        ChildSpec::worker("never-ready", move |ctx: ChildContext| {
            let log = log.clone();
            async move {
                log.push("start never-ready");
                ctx.cancelled().await;
                log.push("stop never-ready");
                Ok(())
            }
        })
        .ready_timeout(secs(2))
    };
    let result = SupervisorSpec::new("root")
        .child(steady(&log, "a"))
        .child(ChildSpec::supervisor(
            SupervisorSpec::new("Inner")
                .child(steady(&log, "b"))
                .child(never_ready),
        ))
        .child(steady(&log, "c"))
        .start()
        .await;

    match result {
        Err(Error::StartFailed {
            supervisor,
            child,
            reason,
        }) => {
            assert_eq!((supervisor.as_str(), child.as_str()), ("root", "Inner"));
            assert!(
                reason.contains("never-ready") && reason.contains("not ready within 2s"),
                "{reason}"
            );
        }
        other => panic!("expected StartFailed, got {other:?}"),
    }
    assert_eq!(
        log.take(),
        [
            "start a",
            "start b",
            "start never-ready",
            "stop b",
            "stop a"
        ],
        "c never starts; the not-ready worker is aborted, the rest stop in reverse"
    );
}

#[tokio::test(start_paused = true)]
async fn nested_children_are_reached_by_path_and_kills_count_as_failures() {
    let (log, events) = (Log::default(), Events::default());
    let handle = SupervisorSpec::new("root")
        .intensity(5, secs(10))
        .on_event(events.hook())
        .child(steady(&log, "router"))
        .child(ChildSpec::supervisor(SupervisorSpec::new("Models")))
        .start()
        .await
        .expect("tree starts");

    let models = handle.supervisor("Models").expect("Models runs");
    assert_eq!(models.path(), "root/Models");
    models
        .start_child(stubborn(&log, "m"))
        .await
        .expect("m starts");
    settle().await;
    let snapshot = handle.snapshot();
    assert_eq!(node(&snapshot, "Models").kind, NodeKind::Supervisor);
    let m = node(&snapshot, "Models/m");
    assert_eq!((m.kind, m.state), (NodeKind::Worker, NodeState::Running));

    handle.kill_child("Models/m").await.expect("m is killed");
    settle().await;
    let snapshot = handle.snapshot();
    let m = node(&snapshot, "Models/m");
    assert_eq!(
        (m.state, m.restarts, m.last_failure.as_deref()),
        (NodeState::Running, 1, Some("killed"))
    );
    assert_eq!(
        node(&snapshot, "Models").restarts,
        0,
        "Models handled it alone"
    );

    // Killing a supervisor takes its subtree down and counts as its failure.
    log.take();
    handle.kill_child("Models").await.expect("Models is killed");
    settle().await;
    assert_eq!(
        log.take(),
        ["dropped m"],
        "no orphan survives its supervisor"
    );
    let snapshot = handle.snapshot();
    let models_node = node(&snapshot, "Models");
    assert_eq!(
        (
            models_node.state,
            models_node.restarts,
            models_node.last_failure.as_deref()
        ),
        (NodeState::Running, 1, Some("killed"))
    );
    assert!(
        snapshot.find("Models/m").is_none(),
        "a restarted supervisor starts from its spec, without runtime children"
    );
    assert_eq!(node(&snapshot, "router").restarts, 0);
    assert!(
        events
            .exits()
            .contains(&("Models".to_owned(), Exit::Killed))
    );

    assert!(
        models.is_terminated(),
        "the old incarnation's handle is dead"
    );
    assert!(matches!(ended(&models).await, Err(Error::Aborted { .. })));
    assert!(matches!(
        models.start_child(steady(&log, "late")).await,
        Err(Error::Terminated { .. })
    ));
    assert!(matches!(
        handle.kill_child("router/x").await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        handle.kill_child("nope").await,
        Err(Error::NotFound { .. })
    ));

    handle
        .terminate_child("Models")
        .await
        .expect("Models stops");
    assert_eq!(node(&handle.snapshot(), "Models").state, NodeState::Stopped);
    assert!(matches!(
        handle.kill_child("Models").await,
        Err(Error::NotRunning { .. })
    ));
    handle.shutdown().await.expect("clean shutdown");
    assert_eq!(log.take(), ["stop router"]);
}

#[tokio::test(start_paused = true)]
async fn invalid_specs_are_refused_before_anything_starts() {
    let log = Log::default();
    let result = SupervisorSpec::new("root")
        .child(steady(&log, "a"))
        .child(ChildSpec::supervisor(
            SupervisorSpec::new("Inner")
                .child(steady(&log, "x"))
                .child(steady(&log, "x")),
        ))
        .start()
        .await;
    assert!(
        matches!(&result, Err(Error::InvalidSpec { supervisor, .. }) if supervisor == "root/Inner"),
        "{result:?}"
    );
    settle().await;
    assert!(log.take().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_worker_manages_its_siblings_and_sees_the_root_through_its_context() {
    let log = Log::default();
    // A worker under Models that, on every (re)start, starts a sibling through its own
    // supervisor's handle and logs the root's name: what a model host does after its supervisor
    // comes back from a restart without the children added at run time.
    let host = {
        let log = log.clone();
        ChildSpec::worker("host", move |ctx: ChildContext| {
            let log = log.clone();
            async move {
                log.push(format!(
                    "host under {} in {}",
                    ctx.supervisor().path(),
                    ctx.root().name()
                ));
                let sibling = steady(&log, "model");
                match ctx.supervisor().start_child(sibling).await {
                    Ok(()) => log.push("sibling started"),
                    Err(e) => log.push(format!("sibling refused: {e}")),
                }
                ctx.cancelled().await;
                Ok(())
            }
        })
    };
    let root = SupervisorSpec::new("System")
        .child(ChildSpec::supervisor(
            SupervisorSpec::new("Models")
                .intensity(5, secs(10))
                .child(host),
        ))
        .start()
        .await
        .unwrap();
    settle().await;
    assert_eq!(
        log.take(),
        [
            "host under System/Models in System",
            "start model",
            "sibling started"
        ]
    );
    assert_eq!(
        node(&root.snapshot(), "Models/model").state,
        NodeState::Running
    );
    // Models restarted: it comes back from its spec (host only), and the host puts the
    // sibling back through the new incarnation's handle.
    root.kill_child("Models").await.unwrap();
    settle().await;
    sleep(secs(1)).await;
    let after = log.take();
    assert_eq!(
        after.iter().filter(|e| *e == "sibling started").count(),
        1,
        "{after:?}"
    );
    assert_eq!(after.last().map(String::as_str), Some("sibling started"));
    assert_eq!(restarts(&root, &["Models"]), [1]);
    assert_eq!(
        node(&root.snapshot(), "Models/model").state,
        NodeState::Running
    );
    root.shutdown().await.unwrap();
}
