//! Event fan-out, back-pressure policies and subscription lifetime.

use std::pin::pin;

use futures::{StreamExt, poll};
use veraltheim_bus::{Bus, BusError, Event, SubscribeOptions, TraceParent, WhenFull, with_trace};

fn event(topic: &str, n: u32) -> Event {
    Event::new(topic, format!("event {n}")).with_attribute("n", n.to_string())
}

fn number(event: &Event) -> u32 {
    event.attributes["n"].parse().expect("tests set n")
}

#[tokio::test]
async fn fans_out_to_every_matching_subscription_only() {
    let bus = Bus::new();
    let options = SubscribeOptions::new(8, WhenFull::Reject);
    let mut exact = bus
        .subscribe("jobs.7.state", options.clone())
        .expect("valid");
    let mut one = bus
        .subscribe("jobs.*.state", options.clone())
        .expect("valid");
    let mut all_jobs = bus.subscribe("jobs.>", options.clone()).expect("valid");
    let mut models = bus.subscribe("models.>", options).expect("valid");

    let report = bus
        .publish(event("jobs.7.state", 1))
        .await
        .expect("valid topic");
    assert_eq!(report.matched, 3);
    assert_eq!(report.queued, 3);
    let report = bus
        .publish(event("jobs.8.progress", 2))
        .await
        .expect("valid topic");
    assert_eq!(report.matched, 1);

    for subscription in [&mut exact, &mut one, &mut all_jobs] {
        let got = subscription.try_recv().expect("queued");
        assert_eq!(got.event.topic, "jobs.7.state");
        assert_eq!(got.missed_before, 0);
    }
    assert_eq!(all_jobs.try_recv().map(|d| number(&d.event)), Some(2));
    assert!(exact.try_recv().is_none());
    assert!(one.try_recv().is_none());
    assert!(models.try_recv().is_none());
    assert_eq!(models.stats().delivered, 0);
}

#[tokio::test]
async fn block_makes_the_publisher_wait_for_a_slow_subscriber() {
    let bus = Bus::new();
    let mut slow = bus
        .subscribe("jobs.>", SubscribeOptions::new(2, WhenFull::Block))
        .expect("valid");
    bus.publish(event("jobs.a", 0)).await.expect("room");
    bus.publish(event("jobs.a", 1)).await.expect("room");

    let mut third = pin!(bus.publish(event("jobs.a", 2)));
    assert!(
        poll!(third.as_mut()).is_pending(),
        "queue full: publisher waits"
    );
    assert!(poll!(third.as_mut()).is_pending(), "still waiting");
    assert_eq!(slow.stats().blocked, 1, "one publish waited, counted once");

    assert_eq!(slow.recv().await.map(|e| number(&e)), Some(0));
    let report = third.await.expect("room was made");
    assert_eq!(report.queued, 1);

    assert_eq!(slow.recv().await.map(|e| number(&e)), Some(1));
    assert_eq!(slow.recv().await.map(|e| number(&e)), Some(2));
    let stats = slow.stats();
    assert_eq!((stats.delivered, stats.received), (3, 3));
    assert_eq!((stats.lagged, stats.dropped, stats.blocked), (0, 0, 1));
}

#[tokio::test]
async fn block_publisher_is_released_when_the_subscriber_goes_away() {
    let bus = Bus::new();
    let slow = bus
        .subscribe("jobs.>", SubscribeOptions::new(1, WhenFull::Block))
        .expect("valid");
    bus.publish(event("jobs.a", 0)).await.expect("room");
    let mut second = pin!(bus.publish(event("jobs.a", 1)));
    assert!(poll!(second.as_mut()).is_pending());
    drop(slow);
    let report = second.await.expect("released");
    assert_eq!((report.matched, report.queued, report.closed), (1, 0, 1));
    assert!(bus.subscriptions().is_empty(), "dropping unsubscribes");
    assert_eq!(
        bus.publish(event("jobs.a", 2)).await.expect("ok").matched,
        0
    );
}

#[tokio::test]
async fn drop_oldest_keeps_the_newest_and_reports_the_lag() {
    let bus = Bus::new();
    let mut slow = bus
        .subscribe("gpus.>", SubscribeOptions::new(3, WhenFull::DropOldest))
        .expect("valid");
    let mut fast = bus
        .subscribe("gpus.>", SubscribeOptions::new(16, WhenFull::DropOldest))
        .expect("valid");
    let mut dropped_oldest = 0;
    for n in 0..10 {
        let report = bus.publish(event("gpus.0.usage", n)).await.expect("valid");
        assert_eq!(report.queued, 2, "DropOldest always queues");
        dropped_oldest += report.dropped_oldest;
    }
    assert_eq!(dropped_oldest, 7);

    let first = slow.recv_delivery().await.expect("queued");
    assert_eq!((number(&first.event), first.missed_before), (7, 7));
    let rest: Vec<_> = [slow.try_recv(), slow.try_recv()]
        .into_iter()
        .map(|d| d.map(|d| (number(&d.event), d.missed_before)))
        .collect();
    assert_eq!(rest, vec![Some((8, 0)), Some((9, 0))]);
    let stats = slow.stats();
    assert_eq!((stats.delivered, stats.received, stats.lagged), (10, 3, 7));
    assert_eq!((stats.dropped, stats.blocked, stats.queued), (0, 0, 0));

    let fast_stats = fast.stats();
    assert_eq!((fast_stats.delivered, fast_stats.lagged), (10, 0));
    assert_eq!(fast.recv().await.map(|e| number(&e)), Some(0));
}

#[tokio::test]
async fn drop_oldest_with_capacity_one_charges_the_gap_to_the_survivor() {
    let bus = Bus::new();
    let mut slow = bus
        .subscribe("a", SubscribeOptions::new(1, WhenFull::DropOldest))
        .expect("valid");
    for n in 0..4 {
        bus.publish(event("a", n)).await.expect("valid");
    }
    let got = slow.try_recv().expect("newest kept");
    assert_eq!((number(&got.event), got.missed_before), (3, 3));
}

#[tokio::test]
async fn reject_drops_new_events_for_the_full_subscriber_only() {
    let bus = Bus::new();
    let mut slow = bus
        .subscribe(
            "jobs.*.state",
            SubscribeOptions::new(3, WhenFull::Reject).named("slow"),
        )
        .expect("valid");
    let mut fast = bus
        .subscribe("jobs.*.state", SubscribeOptions::new(32, WhenFull::Reject))
        .expect("valid");
    let mut rejected = 0;
    for n in 0..10 {
        let report = bus.publish(event("jobs.1.state", n)).await.expect("valid");
        if n >= 3 {
            assert_eq!(
                report.rejected,
                vec![slow.id()],
                "publish {n} names the full one"
            );
        }
        rejected += report.rejected.len();
    }
    assert_eq!(rejected, 7);
    let kept: Vec<_> = std::iter::from_fn(|| slow.try_recv())
        .map(|d| (number(&d.event), d.missed_before))
        .collect();
    assert_eq!(kept, vec![(0, 0), (1, 0), (2, 0)]);

    bus.publish(event("jobs.1.state", 10)).await.expect("valid");
    let after_gap = slow.try_recv().expect("room again");
    assert_eq!((number(&after_gap.event), after_gap.missed_before), (10, 7));

    let stats = slow.stats();
    assert_eq!(stats.name.as_deref(), Some("slow"));
    assert_eq!((stats.delivered, stats.received, stats.dropped), (4, 4, 7));
    assert_eq!((stats.lagged, stats.blocked), (0, 0));
    assert_eq!(fast.stats().delivered, 11);
    assert_eq!(fast.stats().dropped, 0);
    let all: Vec<u32> = std::iter::from_fn(|| fast.try_recv())
        .map(|d| number(&d.event))
        .collect();
    assert_eq!(all, (0..=10).collect::<Vec<_>>());
}

#[tokio::test]
async fn the_bus_reports_every_subscription() {
    let bus = Bus::new();
    let _a = bus
        .subscribe("a.>", SubscribeOptions::new(1, WhenFull::Block))
        .expect("valid");
    let b = bus
        .subscribe("b.*", SubscribeOptions::new(1, WhenFull::Reject))
        .expect("valid");
    let patterns: Vec<String> = bus.subscriptions().into_iter().map(|s| s.pattern).collect();
    assert_eq!(patterns, vec!["a.>".to_owned(), "b.*".to_owned()]);
    drop(b);
    assert_eq!(bus.subscriptions().len(), 1);
}

#[tokio::test]
async fn bad_topics_patterns_and_capacities_are_errors() {
    let bus = Bus::new();
    assert!(matches!(
        bus.publish(Event::new("jobs.*", "")).await,
        Err(BusError::InvalidTopic { .. })
    ));
    assert!(matches!(
        bus.subscribe("jobs.>.x", SubscribeOptions::new(1, WhenFull::Block)),
        Err(BusError::InvalidPattern { .. })
    ));
    assert!(matches!(
        bus.subscribe("jobs", SubscribeOptions::new(0, WhenFull::Block)),
        Err(BusError::ZeroCapacity { .. })
    ));
    let mut bad_trace = Event::new("jobs", "");
    bad_trace.traceparent = "00-zz".to_owned();
    assert!(matches!(
        bus.publish(bad_trace).await,
        Err(BusError::InvalidTraceparent { .. })
    ));
}

#[tokio::test]
async fn events_carry_the_trace_context_of_their_cause() {
    let bus = Bus::new();
    let mut sub = bus
        .subscribe(">", SubscribeOptions::new(8, WhenFull::Reject))
        .expect("valid");
    let request = TraceParent::new([1; 16], [2; 8], true).expect("valid ids");
    let explicit = TraceParent::new([3; 16], [4; 8], false).expect("valid ids");

    with_trace(request, bus.publish(Event::new("jobs.1.state", "captured")))
        .await
        .expect("valid");
    with_trace(
        request,
        bus.publish(Event::new("jobs.1.state", "own").with_trace(explicit)),
    )
    .await
    .expect("valid");
    bus.publish(Event::new("jobs.1.state", "none"))
        .await
        .expect("valid");

    let captured = sub.recv().await.expect("queued");
    assert_eq!(captured.traceparent, request.to_string());
    assert_eq!(captured.trace(), Some(request));
    let own = sub.recv().await.expect("queued");
    assert_eq!(own.trace(), Some(explicit), "an event's own context wins");
    let none = sub.recv().await.expect("queued");
    assert_eq!(none.traceparent, "");
    assert_eq!(none.trace(), None);
}

#[tokio::test]
async fn subscriptions_end_after_draining_when_the_bus_is_gone() {
    let bus = Bus::new();
    let sub = bus
        .subscribe("x", SubscribeOptions::new(4, WhenFull::Block))
        .expect("valid");
    bus.publish(event("x", 1)).await.expect("valid");
    bus.publish(event("x", 2)).await.expect("valid");
    drop(bus);
    let numbers: Vec<u32> = sub.into_stream().map(|e| number(&e)).collect().await;
    assert_eq!(numbers, vec![1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_lose_nothing_under_block() {
    let bus = Bus::new();
    let mut sub = bus
        .subscribe("load.>", SubscribeOptions::new(4, WhenFull::Block))
        .expect("valid");
    let publishers: Vec<_> = (0..4u32)
        .map(|p| {
            let bus = bus.clone();
            tokio::spawn(async move {
                for n in 0..100 {
                    bus.publish(event(&format!("load.{p}"), p * 1000 + n))
                        .await
                        .expect("valid");
                }
            })
        })
        .collect();
    let mut seen = Vec::new();
    for _ in 0..400 {
        seen.push(number(&sub.recv().await.expect("publishers still running")));
    }
    for publisher in publishers {
        publisher.await.expect("publisher task completes");
    }
    for p in 0..4 {
        let mine: Vec<u32> = seen.iter().copied().filter(|n| n / 1000 == p).collect();
        assert_eq!(
            mine,
            (0..100).map(|n| p * 1000 + n).collect::<Vec<_>>(),
            "in order"
        );
    }
    let stats = sub.stats();
    assert_eq!((stats.delivered, stats.lagged, stats.dropped), (400, 0, 0));
}

#[tokio::test]
async fn a_subscription_with_its_own_test_queues_only_what_it_takes() {
    let bus = Bus::new();
    let mut picky = bus
        .subscribe_where(
            ">",
            SubscribeOptions::new(1, WhenFull::Reject),
            |e: &Event| e.topic.starts_with("jobs.") && !e.attributes.contains_key("skip"),
        )
        .expect("valid");
    let report = bus.publish(event("models.a", 0)).await.expect("valid");
    assert_eq!(report.matched, 0, "refused events are not matched");
    bus.publish(event("jobs.a", 1).with_attribute("skip", "yes"))
        .await
        .expect("valid");
    bus.publish(event("jobs.a", 2)).await.expect("valid");
    // The queue holds one: the refused events took no room and counted nowhere.
    let report = bus.publish(event("jobs.a", 3)).await.expect("valid");
    assert_eq!(report.rejected, vec![picky.id()]);
    let stats = picky.stats();
    assert_eq!((stats.delivered, stats.dropped), (1, 1));
    assert_eq!(picky.try_recv().map(|d| number(&d.event)), Some(2));
    assert!(picky.try_recv().is_none());
}
