//! The load generator end to end, in-process: the bare tonic echo server and a short closed and
//! open loop against it over real gRPC on loopback. Asserts behaviour only (requests flowed, no
//! errors), never timings.

use veraltheim_benches::load::args::{LoadSpec, Mode};
use veraltheim_benches::load::client::run_load;
use veraltheim_benches::load::echo::EchoServer;
use veraltheim_benches::load::http::Protocol;

use std::time::Duration;

fn spec(mode: Mode) -> LoadSpec {
    LoadSpec {
        model: "identity".into(),
        shape: "1x16".parse().unwrap(),
        mode,
        warmup: Duration::from_millis(100),
        duration: Duration::from_millis(500),
        request_timeout: Duration::from_secs(10),
        tls: Default::default(),
        protocol: Protocol::Grpc,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_against_the_echo_server() {
    let server = EchoServer::start(1).unwrap();
    let addr = server.addr().to_string();
    let report = run_load(
        "echo",
        &addr,
        &spec(Mode::Closed {
            concurrency: 4,
            clients_per_channel: 2,
        }),
        None,
        None,
    )
    .await
    .unwrap();
    server.stop().unwrap();
    assert!(report.requests > 0, "{report:?}");
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(report.channels, 2);
    assert_eq!(report.concurrency, Some(4));
    assert!(report.throughput_rps > 0.0);
    assert!(report.latency_us.p50_us > 0 && report.latency_us.p99_us >= report.latency_us.p50_us);
    if cfg!(target_os = "linux") {
        // The echo server's threads were found and sampled over the window.
        let cpu = report.cpu.expect("cpu sampled");
        assert!(cpu.server_cores.is_some(), "{cpu:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_against_the_echo_server() {
    let server = EchoServer::start(1).unwrap();
    let addr = server.addr().to_string();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let report = run_load(
        "echo",
        &addr,
        &spec(Mode::Open {
            rate: 200.0,
            channels: 1,
            max_outstanding: 64,
        }),
        None,
        Some(tx),
    )
    .await
    .unwrap();
    server.stop().unwrap();
    // The measured window was announced.
    rx.await.unwrap();
    // 200/s for 0.5 s schedules 100 measured requests; each is answered, errs or is shed.
    let accounted = report.requests + report.error_total() + report.client_shed.unwrap();
    assert_eq!(accounted, 100, "{report:?}");
    assert!(
        report.requests > 0 && report.errors.is_empty(),
        "{report:?}"
    );
}

#[tokio::test]
async fn an_absent_server_is_an_error_not_a_hang() {
    // A port that was free a moment ago: the connection is refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let r = run_load(
        "none",
        &format!("127.0.0.1:{port}"),
        &spec(Mode::Closed {
            concurrency: 1,
            clients_per_channel: 1,
        }),
        None,
        None,
    )
    .await;
    assert!(r.is_err());
}
