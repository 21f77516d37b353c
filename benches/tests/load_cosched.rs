//! `veraltheim-load cosched` end to end against the real `veraltheim serve` (the binary of this
//! workspace's target directory), with the built-in `cost` model standing in for MiniLM so that
//! it runs in seconds: the three runs happen, online requests are answered in every window, the
//! batch job advances and both jobs are cancelled at the end, and no command-job process is
//! left behind. Asserts behaviour, never timings or the targets.

use clap::Parser as _;
use veraltheim_benches::load::args::{Cli, Command};
use veraltheim_benches::load::coordinator::default_binary;
use veraltheim_benches::load::cosched::{RunKind, cosched};

/// Processes whose command line holds `marker` (Linux; none elsewhere).
fn processes_with(marker: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline
                .contains(marker)
                .then(|| format!("{}: {cmdline}", e.file_name().to_string_lossy()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_runs_with_the_cost_stand_in() {
    let binary = default_binary().expect("the veraltheim binary (cargo build -p veraltheim)");
    // A marker in the command job's script, to find its processes afterwards.
    let marker = format!("cosched-smoke-{}", std::process::id());
    let command = format!("while :; do :; done # {marker}");
    let cli = Cli::try_parse_from([
        "veraltheim-load",
        "cosched",
        "--model",
        "cost",
        "--veraltheim-bin",
        binary.to_str().unwrap(),
        "--cost-base-us",
        "2000",
        "--cost-per-item-us",
        "20",
        "--capacity-concurrency",
        "16",
        "--capacity-duration",
        "1",
        "--online-fraction",
        "0.2",
        "--warmup",
        "0.5",
        "--duration",
        "2",
        "--window",
        "1",
        "--batch-sentences",
        "50000",
        "--command",
        &command,
    ])
    .unwrap();
    let Command::Cosched(args) = cli.command else {
        panic!("not the cosched command")
    };
    let report = cosched(&args).await.unwrap();
    assert!(report.capacity.sentences_per_s > 0.0);
    assert!(report.capacity.measured.is_some());
    let kinds: Vec<RunKind> = report.runs.iter().map(|r| r.kind).collect();
    assert_eq!(
        kinds,
        [RunKind::Alone, RunKind::Strict, RunKind::Controller]
    );
    for run in &report.runs {
        assert_eq!(run.windows.len(), 2, "{:?}", run.kind);
        for w in &run.windows {
            assert!(w.offered > 0 && w.answered > 0, "{:?}: {w:?}", run.kind);
        }
        assert_eq!(run.objective_set, run.kind == RunKind::Controller);
        // The objective reached the server in the controller run only, and its controller
        // reported at every window's end.
        assert_eq!(
            run.controller_seen,
            run.kind == RunKind::Controller,
            "{:?}",
            run.kind
        );
        if run.kind == RunKind::Controller {
            for w in &run.windows {
                let c = w.controller.as_ref().expect("the controller's state");
                assert_eq!(c.slo_p99_ms, 100);
                assert!(!c.decision.is_empty(), "{c:?}");
            }
        }
        if run.kind == RunKind::Alone {
            assert!(run.batch.is_none() && run.command.is_none());
            assert!(
                run.windows
                    .iter()
                    .all(|w| w.batch_sentences_per_s.is_none())
            );
            continue;
        }
        let batch = run.batch.as_ref().expect("a batch job");
        assert_eq!(batch.job.state_at_start, "RUNNING", "{batch:?}");
        assert!(batch.done_at_end > batch.done_at_start, "{batch:?}");
        assert!(batch.done_at_end < batch.lines as u64, "{batch:?}");
        assert!(batch.sentences_per_s > 0.0);
        assert_eq!(batch.job.state_at_end, "CANCELLED", "{batch:?}");
        assert!(
            run.windows
                .iter()
                .all(|w| w.batch_sentences_per_s.is_some())
        );
        let command = run.command.as_ref().expect("a command job");
        assert_eq!(command.state_at_end, "CANCELLED", "{command:?}");
    }
    assert!(report.controller_within_slo_every_window.is_some());
    // The report prints, and as one JSON object.
    assert!(
        report.text().contains("run controller"),
        "{}",
        report.text()
    );
    let v = serde_json::to_value(&report).unwrap();
    assert_eq!(v["runs"].as_array().unwrap().len(), 3);
    // Every process of the command jobs is gone (cancelled, and the servers stopped).
    let left = processes_with(&marker);
    assert!(left.is_empty(), "left running: {left:?}");
}
