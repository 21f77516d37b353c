//! Replays the fuzz corpus (`fuzz/corpus/<target>/`) and the inputs that once crashed a target
//! (`fuzz/regressions/<target>/`) through the same entry points the fuzz targets call, without
//! libFuzzer: every input must be refused or accepted, never panic. A crash found by fuzzing is
//! fixed and its input kept under `regressions/`, so it stays fixed.

use std::path::{Path, PathBuf};

type Entry = fn(&[u8]);

const TARGETS: &[(&str, Entry)] = &[
    (
        "kserve_infer_request",
        veraltheim::fuzz::kserve_infer_request,
    ),
    ("rest_infer_request", veraltheim::fuzz::rest_infer_request),
    ("job_file", veraltheim::fuzz::job_file),
    ("auth_file", veraltheim::fuzz::auth_file),
    ("model_config_json", veraltheim_models::fuzz::config_json),
    ("model_config_pbtxt", veraltheim_models::fuzz::config_pbtxt),
];

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

#[test]
fn every_corpus_and_regression_input_is_handled_without_a_panic() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    for (target, entry) in TARGETS {
        let corpus = inputs(&fuzz.join("corpus").join(target));
        assert!(
            !corpus.is_empty(),
            "fuzz/corpus/{target} is empty: the seeds are part of the repository"
        );
        let regressions = inputs(&fuzz.join("regressions").join(target));
        for file in corpus.iter().chain(&regressions) {
            let data = std::fs::read(file).unwrap();
            let outcome = std::panic::catch_unwind(|| entry(&data));
            assert!(outcome.is_ok(), "{target}: {} panicked", file.display());
        }
    }
}
