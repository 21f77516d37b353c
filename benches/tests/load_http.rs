//! The load generator's KServe-over-HTTP transport (`--protocol http|http-binary`) against the
//! real `veraltheim serve` (the binary of this workspace's target directory): requests flow and
//! are answered, and the server counts exactly as many successes as the load sent. Asserts
//! behaviour, never timings.

use std::time::Duration;

use veraltheim_benches::load::args::{LoadSpec, Mode};
use veraltheim_benches::load::client::run_load;
use veraltheim_benches::load::coordinator::{Coordinator, default_binary};
use veraltheim_benches::load::http::Protocol;

fn spec(protocol: Protocol) -> LoadSpec {
    LoadSpec {
        model: "identity".into(),
        shape: "1x16".parse().unwrap(),
        mode: Mode::Closed {
            concurrency: 3,
            clients_per_channel: 1,
        },
        // No warm-up: every request the load sends lands in its window or after it.
        warmup: Duration::ZERO,
        duration: Duration::from_millis(400),
        request_timeout: Duration::from_secs(10),
        tls: Default::default(),
        protocol,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_and_binary_http_loads_are_served_and_counted() {
    let binary = default_binary().expect("the veraltheim binary (cargo build --workspace)");
    let server = Coordinator::start(&binary, &["identity".to_string()], 0)
        .await
        .unwrap();
    let addr = server.http_addr().to_string();
    for protocol in [Protocol::Http, Protocol::HttpBinary] {
        let before = server.counts("identity").await.unwrap();
        let report = run_load("coordinator", &addr, &spec(protocol), None, None)
            .await
            .unwrap();
        let after = server.counts("identity").await.unwrap();
        assert!(report.requests > 0, "{protocol:?}: {report:?}");
        assert!(report.errors.is_empty(), "{protocol:?}: {report:?}");
        assert_eq!(report.channels, 3, "one connection per client");
        // Requests answered after the window are not in the report, but the server saw them.
        assert!(
            after.success.0 - before.success.0 >= report.requests,
            "{protocol:?}: the server counted {} successes, the load {}",
            after.success.0 - before.success.0,
            report.requests
        );
    }
    // The open loop is gRPC's only: refused with the reason.
    let mut open = spec(Protocol::Http);
    open.mode = Mode::Open {
        rate: 10.0,
        max_outstanding: 4,
        channels: 1,
    };
    let e = run_load("coordinator", &addr, &open, None, None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("closed loop only"), "{e}");
    server.stop().await.unwrap();
}
