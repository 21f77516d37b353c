//! Chaos: load on `identity` and `cost` while the `fault` model panics and random supervised
//! tasks are killed. Every request must end (answer or error) within its deadline, the tree must
//! come back whole, and `status` must count the restarts.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use veraltheim_proto::v1::{
    self, inference_service_client::InferenceServiceClient,
    system_service_client::SystemServiceClient,
};

mod common;

/// Starts the binary with `extra` flags and a channel to it.
async fn start(extra: &[&str]) -> (common::Server, Channel) {
    let server = common::start(extra).await;
    let ch = common::channel(&server).await;
    (server, ch)
}

fn paths(node: &v1::SupervisorNode, prefix: &str, out: &mut Vec<String>) {
    for c in &node.children {
        let p = if prefix.is_empty() {
            c.name.clone()
        } else {
            format!("{prefix}/{}", c.name)
        };
        out.push(p.clone());
        paths(c, &p, out);
    }
}

fn all_running(node: &v1::SupervisorNode) -> bool {
    node.state == "running" && node.children.iter().all(all_running)
}

fn restarts(node: &v1::SupervisorNode) -> u32 {
    node.restarts + node.children.iter().map(restarts).sum::<u32>()
}

fn batchers(node: &v1::SupervisorNode) -> usize {
    node.children
        .iter()
        .map(|c| usize::from(c.name == "batcher" && c.state == "running") + batchers(c))
        .sum()
}

fn fp32(v: f32) -> v1::Tensor {
    v1::Tensor {
        name: "INPUT0".into(),
        datatype: v1::DataType::Fp32 as i32,
        shape: vec![1, 2],
        data: Some(v1::tensor::Data::Values(v1::TensorValues {
            fp32: vec![v, 1.0],
            ..Default::default()
        })),
    }
}

/// A deterministic pseudo-random sequence (xorshift), so a failing run can be replayed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tree_recovers_and_no_request_hangs() {
    let (_server, ch) = start(&["--enable-fault-injection"]).await;

    let until = Instant::now() + Duration::from_secs(6);
    let deadline = Duration::from_secs(2);
    let (ok, failed, hung) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let mut load = Vec::new();
    for i in 0..8 {
        let model = match i % 3 {
            0 => "cost",
            1 => "identity",
            _ => "fault",
        };
        let (ch, ok, failed, hung) = (ch.clone(), ok.clone(), failed.clone(), hung.clone());
        load.push(tokio::spawn(async move {
            let mut client = InferenceServiceClient::new(ch);
            while Instant::now() < until {
                let mut req = tonic::Request::new(v1::InferRequest {
                    model: model.into(),
                    inputs: vec![fp32(i as f32)],
                    ..Default::default()
                });
                req.set_timeout(deadline);
                // The deadline plus slack for a reconnect: past this the request hangs.
                match tokio::time::timeout(deadline + Duration::from_secs(3), client.infer(req))
                    .await
                {
                    Err(_) => hung.fetch_add(1, Ordering::Relaxed),
                    Ok(Ok(_)) => ok.fetch_add(1, Ordering::Relaxed),
                    Ok(Err(_)) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }

    let mut system = SystemServiceClient::new(ch.clone());
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut kills = Vec::new();
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let Ok(status) = system.get_status(v1::GetStatusRequest {}).await else {
            continue;
        };
        let mut all = Vec::new();
        paths(&status.into_inner().root.unwrap(), "", &mut all);
        let path = all[(rng.next() % all.len() as u64) as usize].clone();
        if system
            .kill_child(v1::KillChildRequest { path: path.clone() })
            .await
            .is_ok()
        {
            kills.push(path);
        }
    }
    for t in load {
        t.await.unwrap();
    }
    assert_eq!(
        hung.load(Ordering::Relaxed),
        0,
        "requests hung; kills: {kills:?}"
    );
    assert!(ok.load(Ordering::Relaxed) > 0);
    assert!(
        failed.load(Ordering::Relaxed) > 0,
        "fault requests must fail"
    );
    assert!(kills.len() >= 5, "{kills:?}");

    // The tree comes back whole: every node running, one batcher per model.
    let recovered = Instant::now() + Duration::from_secs(20);
    let root = loop {
        let root = system
            .get_status(v1::GetStatusRequest {})
            .await
            .map(|s| s.into_inner().root.unwrap());
        if let Ok(root) = &root
            && all_running(root)
            && batchers(root) == 3
        {
            break root.clone();
        }
        assert!(
            Instant::now() < recovered,
            "the tree did not recover; kills: {kills:?}; tree: {root:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        restarts(&root) > 0,
        "status counts no restart; kills: {kills:?}"
    );
    let health = system
        .health(v1::HealthRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(health.live && health.ready);
    let r = InferenceServiceClient::new(ch)
        .infer(v1::InferRequest {
            model: "identity".into(),
            inputs: vec![fp32(9.0)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.outputs.len(), 1);
}

#[tokio::test]
async fn kill_child_needs_fault_injection() {
    let (_server, ch) = start(&[]).await;
    let err = SystemServiceClient::new(ch)
        .kill_child(v1::KillChildRequest {
            path: "API/http".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
}
