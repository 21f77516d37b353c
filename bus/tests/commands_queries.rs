//! Commands (one handler, one reply) and queries (many handlers, gathered replies).

use std::time::Duration;

use tokio::time::Instant;
use veraltheim_bus::{Bus, BusError, Command, Query, TraceParent, with_trace};

#[derive(Debug)]
struct Double(u64);
impl Command for Double {
    const NAME: &'static str = "math.double";
    type Reply = u64;
}

#[derive(Debug)]
struct Impostor;
impl Command for Impostor {
    const NAME: &'static str = "math.double";
    type Reply = ();
}

#[derive(Debug, Clone)]
struct Who;
impl Query for Who {
    const NAME: &'static str = "who";
    type Reply = &'static str;
}

fn serve_double(bus: &Bus) -> tokio::task::JoinHandle<()> {
    let mut inbox = bus.handle_commands::<Double>(4).expect("first handler");
    tokio::spawn(async move {
        while let Some(request) = inbox.recv().await {
            let _ = request.responder.send(request.command.0 * 2);
        }
    })
}

#[tokio::test]
async fn a_command_reaches_its_one_handler_and_gets_the_reply() {
    let bus = Bus::new();
    let _handler = serve_double(&bus);
    assert_eq!(bus.send(Double(21)).await, Ok(42));
    let pending = bus.try_send(Double(5)).expect("room");
    assert_eq!(pending.await, Ok(10));
}

#[tokio::test]
async fn a_second_handler_is_refused_until_the_first_is_dropped() {
    let bus = Bus::new();
    let first = bus.handle_commands::<Double>(1).expect("first handler");
    assert_eq!(
        bus.handle_commands::<Double>(1).map(|_| ()),
        Err(BusError::HandlerAlreadyRegistered {
            command: "math.double"
        })
    );
    assert_eq!(
        bus.handle_commands::<Impostor>(1).map(|_| ()),
        Err(BusError::TypeMismatch {
            name: "math.double"
        })
    );
    drop(first);
    assert!(bus.handle_commands::<Double>(1).is_ok(), "free again");
}

#[tokio::test]
async fn sending_without_a_handler_is_a_clear_error() {
    let bus = Bus::new();
    let error = bus.send(Double(1)).await.expect_err("nobody handles it");
    assert_eq!(
        error,
        BusError::NoHandler {
            command: "math.double"
        }
    );
    assert!(error.to_string().contains("math.double"));
}

#[tokio::test]
async fn a_full_inbox_sheds_and_a_dropped_request_fails_the_sender() {
    let bus = Bus::new();
    let mut inbox = bus.handle_commands::<Double>(1).expect("first handler");
    let queued = bus.try_send(Double(1)).expect("room for one");
    assert_eq!(
        bus.try_send(Double(2)).map(|_| ()),
        Err(BusError::InboxFull {
            command: "math.double",
            capacity: 1
        })
    );
    let request = inbox.try_recv().expect("queued");
    assert_eq!(request.command.0, 1);
    drop(request);
    assert_eq!(
        queued.await,
        Err(BusError::HandlerDropped {
            command: "math.double"
        })
    );

    let orphan = bus.try_send(Double(3)).expect("room again");
    drop(inbox);
    assert_eq!(
        orphan.await,
        Err(BusError::HandlerDropped {
            command: "math.double"
        })
    );
    assert!(matches!(
        bus.send(Double(4)).await,
        Err(BusError::NoHandler { .. })
    ));
}

#[tokio::test]
async fn commands_and_queries_carry_the_trace_context() {
    let bus = Bus::new();
    let mut commands = bus.handle_commands::<Double>(1).expect("first handler");
    let mut queries = bus.answer_queries::<Who>(1).expect("handler");
    let trace = TraceParent::new([5; 16], [6; 8], true).expect("valid ids");

    let pending = with_trace(trace, async { bus.try_send(Double(1)) })
        .await
        .expect("room");
    let request = commands.try_recv().expect("queued");
    assert_eq!(request.trace, Some(trace));
    let _ = request.responder.send(2);
    assert_eq!(pending.await, Ok(2));

    let asking = tokio::spawn({
        let bus = bus.clone();
        with_trace(trace, async move {
            bus.query(Who, Duration::from_secs(1)).await
        })
    });
    let request = queries.recv().await.expect("asked");
    assert_eq!(request.trace, Some(trace));
    let _ = request.responder.send("a");
    let replies = asking.await.expect("task").expect("types match");
    assert_eq!(replies.replies, vec!["a"]);
}

fn answer_as(bus: &Bus, name: &'static str, delay: Option<Duration>) {
    let mut inbox = bus.answer_queries::<Who>(4).expect("many may answer");
    tokio::spawn(async move {
        while let Some(request) = inbox.recv().await {
            match delay {
                Some(delay) => {
                    tokio::time::sleep(delay).await;
                    let _ = request.responder.send(name);
                }
                None => {
                    let _ = request.responder.send(name);
                }
            }
        }
    });
}

#[tokio::test(start_paused = true)]
async fn a_query_gathers_every_reply_and_returns_when_all_answered() {
    let bus = Bus::new();
    answer_as(&bus, "a", None);
    answer_as(&bus, "b", Some(Duration::from_millis(10)));
    answer_as(&bus, "c", Some(Duration::from_millis(20)));
    let started = Instant::now();
    let mut gathered = bus.query(Who, Duration::from_secs(5)).await.expect("types");
    gathered.replies.sort_unstable();
    assert_eq!(gathered.replies, vec!["a", "b", "c"]);
    assert_eq!(
        (gathered.asked, gathered.busy, gathered.unanswered),
        (3, 0, 0)
    );
    assert!(gathered.is_complete());
    assert_eq!(
        started.elapsed(),
        Duration::from_millis(20),
        "the slowest, not the timeout"
    );
}

#[tokio::test(start_paused = true)]
async fn a_query_times_out_on_slow_handlers_and_counts_them() {
    let bus = Bus::new();
    answer_as(&bus, "fast", None);
    answer_as(&bus, "slow", Some(Duration::from_secs(60)));
    let _silent = bus
        .answer_queries::<Who>(1)
        .expect("registered, never reads");
    let started = Instant::now();
    let gathered = bus
        .query(Who, Duration::from_millis(100))
        .await
        .expect("types");
    assert_eq!(started.elapsed(), Duration::from_millis(100));
    assert_eq!(gathered.replies, vec!["fast"]);
    assert_eq!((gathered.asked, gathered.unanswered), (3, 2));
    assert!(!gathered.is_complete());

    // The silent handler's inbox (capacity 1) now holds the first query: it is busy.
    let again = bus
        .query(Who, Duration::from_millis(100))
        .await
        .expect("types");
    assert_eq!((again.asked, again.busy), (2, 1));
}

#[tokio::test]
async fn a_query_without_handlers_returns_nothing_at_once() {
    let bus = Bus::new();
    let gathered = bus
        .query(Who, Duration::from_secs(3600))
        .await
        .expect("types");
    assert!(gathered.replies.is_empty());
    assert_eq!(
        (gathered.asked, gathered.busy, gathered.unanswered),
        (0, 0, 0)
    );
}
