//! Batch jobs on the Kubernetes executor, through the real binary, against the FAKE Kubernetes
//! API server (`veraltheim_slowpath::kubernetes::fake`, run in this test process): a job runs
//! to SUCCEEDED as a batch/v1 Job, and after a kill -9 of the coordinator a running Job is
//! adopted by its labels — no second Job is created.

use std::path::Path;
use std::time::{Duration, Instant};

use veraltheim_proto::v1::{self, job_service_client::JobServiceClient};
use veraltheim_slowpath::kubernetes::fake::FakeKube;

mod common;

use common::wait_for;

const NS: &str = "veraltheim-jobs";

fn config(dir: &Path, fake: &FakeKube) -> std::path::PathBuf {
    let path = dir.join("kubernetes.toml");
    let text = format!(
        r#"[jobs]
executor = "kubernetes"
[jobs.kubernetes]
api_url = "{}"
namespace = "{NS}"
default_image = "busybox:1.36"
node_selector = ["pool=batch"]
gpus = 2
"#,
        fake.url()
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn command(name: &str, script: &str) -> v1::SubmitJobRequest {
    common::command(name, &["sh", "-c", script])
}

fn job_names(fake: &FakeKube, id: &str) -> Vec<String> {
    fake.jobs(NS)
        .into_iter()
        .filter(|j| {
            j.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("veraltheim.io/job-id"))
                .is_some_and(|v| v == id)
        })
        .filter_map(|j| j.metadata.name)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_k8s_jobs_run_as_kubernetes_jobs_and_survive_kill_9_by_adoption() {
    let fake = FakeKube::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &fake);
    let args = ["--config", config.to_str().unwrap()];

    let mut server = common::start_in(dir.path(), &args).await;
    let mut jobs = JobServiceClient::new(common::channel(&server).await);
    // A job runs to SUCCEEDED as one Job, and its log comes from the pod log API.
    let hello = jobs
        .submit_job(command("hello", "echo hello from a pod; sleep 0.2"))
        .await
        .unwrap()
        .into_inner();
    let done = wait_for(&mut jobs, &hello.id, v1::JobState::Succeeded).await;
    assert_eq!(
        (done.attempt, done.app_failures, done.infra_failures),
        (1, 0, 0)
    );
    assert_eq!(job_names(&fake, &hello.id), [format!("vt-{}-1", hello.id)]);
    let mut logs = jobs
        .job_logs(v1::JobLogsRequest {
            id: hello.id.clone(),
            follow: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut text = Vec::new();
    while let Some(chunk) = logs.message().await.unwrap() {
        assert_eq!(chunk.stream, "combined");
        text.extend_from_slice(&chunk.data);
    }
    assert_eq!(String::from_utf8(text).unwrap(), "hello from a pod\n");

    // A job without an image would be refused if there were no default; an inference job
    // cannot run on Kubernetes at all.
    let err = jobs
        .submit_job(v1::SubmitJobRequest {
            spec: Some(v1::JobSpec {
                name: "infer".into(),
                kind: Some(v1::job_spec::Kind::Inference(v1::InferenceJob {
                    model: "identity".into(),
                    input_path: "/in".into(),
                    output_path: "/out".into(),
                })),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");

    // A long job is running when the coordinator is killed.
    let long = jobs
        .submit_job(command("long", "echo started; fake-hold; echo finished"))
        .await
        .unwrap()
        .into_inner();
    let running = wait_for(&mut jobs, &long.id, v1::JobState::Running).await;
    assert_eq!(running.attempt, 1);
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let creates = fake.count("POST", "/jobs", Some(201));
    assert_eq!(creates, 2);

    let server = common::start_in(dir.path(), &args).await;
    let mut jobs = JobServiceClient::new(common::channel(&server).await);
    // Adopted: still RUNNING as attempt 1; its Job is the one from before the kill.
    let job = jobs
        .get_job(v1::GetJobRequest {
            id: long.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (job.state, job.attempt),
        (v1::JobState::Running as i32, 1),
        "{job:?}"
    );
    let job_name = format!("vt-{}-1", long.id);
    let until = Instant::now() + Duration::from_secs(30);
    while !fake.release(NS, &job_name) {
        assert!(Instant::now() < until, "the adopted Job never ran on");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let done = wait_for(&mut jobs, &long.id, v1::JobState::Succeeded).await;
    assert_eq!((done.attempt, done.infra_failures), (1, 0), "{done:?}");
    assert_eq!(
        fake.count("POST", "/jobs", None),
        creates,
        "no Job was created after the restart"
    );
    assert_eq!(job_names(&fake, &long.id), [job_name]);
}
