//! The model repository: a directory with one folder per model, as Triton lays it out.
//!
//! ```text
//! models/                       (--model-repository)
//!   minilm/
//!     config.pbtxt              Triton's model configuration (text format), or
//!     config.json               the same in its JSON form
//!     1/                        numbered version folders; the backend reads its files here
//!       model.safetensors ...
//!     2/
//! ```
//!
//! The configuration's `name` defaults to the folder's name (and must equal it when given);
//! `version_policy` picks the versions that may serve (default: the latest). Veraltheim serves one
//! version of a model at a time: the highest version the policy selects.
//!
//! `import_sentence_transformers` writes such a folder from the standard sentence-transformers
//! layout (`config.json`, `model.safetensors`, `tokenizer.json`, `1_Pooling/`).

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::Error;

use crate::config::{ModelConfig, ModelWarmup, Parameter, WarmupInput};

/// The configuration file in a model folder: Triton's JSON form...
pub const CONFIG_FILE: &str = "config.json";
/// ...or Triton's own `config.pbtxt` (protobuf text format of `inference.ModelConfig`).
pub const CONFIG_PBTXT: &str = "config.pbtxt";

/// Reads a `config.pbtxt`: parsed against the compiled `inference.ModelConfig` descriptor (so
/// every Triton field and enum name is checked), then handed over in protobuf's JSON mapping,
/// which [`ModelConfig::from_json`] reads. Fields Veraltheim does not use are accepted and ignored,
/// as in the JSON form.
pub fn config_from_pbtxt(text: &str) -> Result<ModelConfig, String> {
    use prost_reflect::DynamicMessage;
    let descriptor = crate::schema::model_config().map_err(|e| e.to_string())?;
    let message = DynamicMessage::parse_text_format(descriptor, &colon_before_lists(text))
        .map_err(|e| e.to_string())?;
    let json = serde_json::to_string(&message).map_err(|e| e.to_string())?;
    ModelConfig::from_json(&json).map_err(|e| e.to_string())
}

/// A model folder, read and checked.
#[derive(Clone, Debug)]
pub struct RepoModel {
    pub name: String,
    /// The model's folder.
    pub dir: PathBuf,
    /// The configuration as the folder declares it (name filled in).
    pub config: ModelConfig,
    /// Every numbered version folder, ascending.
    pub versions: Vec<u64>,
    /// The version that serves: the highest one the version policy selects.
    pub serving: u64,
}

impl RepoModel {
    /// The folder of the serving version.
    pub fn version_dir(&self) -> PathBuf {
        self.dir.join(self.serving.to_string())
    }
}

/// A model repository on disk. Reads are fresh each time: adding a folder or editing a config
/// takes effect at the next load, as with Triton's explicit model control.
#[derive(Clone, Debug)]
pub struct Repository {
    root: PathBuf,
}

impl Repository {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Repository { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The model folders' names. A repository directory that does not exist is empty (the
    /// default `./models` need not exist); one that cannot be read is an error.
    pub fn names(&self) -> Result<Vec<String>, Error> {
        let entries = match fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(Error::Repository {
                    path: self.root.clone(),
                    reason: e.to_string(),
                });
            }
        };
        let mut names = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if name.starts_with('.') || !path.is_dir() {
                continue;
            }
            names.push(name.to_string());
        }
        names.sort();
        Ok(names)
    }

    /// Reads every model folder; folders that fail come back with their error, so that one bad
    /// folder never hides the others.
    pub fn scan(&self) -> Result<Vec<Result<RepoModel, Error>>, Error> {
        Ok(self.names()?.iter().map(|n| self.model(n)).collect())
    }

    /// Reads one model folder.
    pub fn model(&self, name: &str) -> Result<RepoModel, Error> {
        if name.is_empty() || name.contains(['/', '\\']) || name == "." || name == ".." {
            return Err(Error::NotInRepository {
                name: name.to_string(),
                root: self.root.clone(),
            });
        }
        let dir = self.root.join(name);
        if !dir.is_dir() {
            return Err(Error::NotInRepository {
                name: name.to_string(),
                root: self.root.clone(),
            });
        }
        let invalid = |reason: String| Error::InvalidModelFolder {
            name: name.to_string(),
            path: dir.clone(),
            reason,
        };
        let (json, pbtxt) = (dir.join(CONFIG_FILE), dir.join(CONFIG_PBTXT));
        let mut config = match (json.is_file(), pbtxt.is_file()) {
            (true, true) => {
                return Err(invalid(format!(
                    "has both {CONFIG_FILE} and {CONFIG_PBTXT}; keep one"
                )));
            }
            (false, true) => {
                let text = fs::read_to_string(&pbtxt)
                    .map_err(|e| invalid(format!("cannot read {CONFIG_PBTXT}: {e}")))?;
                config_from_pbtxt(&text).map_err(|e| invalid(format!("{CONFIG_PBTXT}: {e}")))?
            }
            _ => {
                let text = fs::read_to_string(&json).map_err(|e| {
                    invalid(format!(
                        "cannot read {CONFIG_FILE}: {e} (a model folder holds {CONFIG_FILE} or {CONFIG_PBTXT}, and numbered version folders)"
                    ))
                })?;
                ModelConfig::from_json(&text).map_err(|e| invalid(format!("{CONFIG_FILE}: {e}")))?
            }
        };
        if config.name.is_empty() {
            config.name = name.to_string();
        } else if config.name != name {
            return Err(invalid(format!(
                "{CONFIG_FILE} names the model '{}' but its folder is '{name}'; they must agree",
                config.name
            )));
        }
        config
            .validate_declared()
            .map_err(|e| invalid(e.to_string()))?;
        let versions =
            version_folders(&dir).map_err(|e| invalid(format!("cannot list versions: {e}")))?;
        let serving = select_version(&config, &versions).map_err(invalid)?;
        // The folder, and every file of the serving version a backend may open, stay inside the
        // repository once symlinks are resolved.
        contained(&self.root, &dir.join(serving.to_string())).map_err(invalid)?;
        Ok(RepoModel {
            name: name.to_string(),
            dir,
            config,
            versions,
            serving,
        })
    }
}

/// Most entries of a version folder looked at by [`contained`]: a model folder holds a handful
/// of files; a folder of millions is refused rather than walked.
const MAX_FOLDER_ENTRIES: usize = 10_000;

/// Checks that `dir` (a model's version folder) and everything under it resolve inside `root`
/// once symlinks are followed: a symlinked model folder, version folder or model file that
/// points elsewhere (`model.onnx -> /etc/shadow`) would have a load read outside the repository.
/// Symlinks that stay inside the repository (shared files between versions) are fine.
pub fn contained(root: &Path, dir: &Path) -> Result<(), String> {
    let root = root
        .canonicalize()
        .map_err(|e| format!("cannot resolve the repository {}: {e}", root.display()))?;
    let outside = |path: &Path, real: &Path| {
        format!(
            "{} resolves to {}, outside the model repository {}",
            path.display(),
            real.display(),
            root.display()
        )
    };
    let mut stack = vec![(dir.to_path_buf(), 0usize)];
    let mut seen = 0usize;
    while let Some((path, depth)) = stack.pop() {
        seen += 1;
        if seen > MAX_FOLDER_ENTRIES {
            return Err(format!(
                "{} holds more than {MAX_FOLDER_ENTRIES} entries",
                dir.display()
            ));
        }
        let real = path
            .canonicalize()
            .map_err(|e| format!("cannot resolve {}: {e}", path.display()))?;
        if !real.starts_with(&root) {
            return Err(outside(&path, &real));
        }
        // Followed through symlinks: a symlinked folder's contents are checked too.
        if real.is_dir() && depth < 8 {
            let entries =
                fs::read_dir(&path).map_err(|e| format!("cannot list {}: {e}", path.display()))?;
            for entry in entries.flatten() {
                stack.push((entry.path(), depth + 1));
            }
        }
    }
    Ok(())
}

/// Protobuf's text format lets a message-list field omit its colon (`input [ { ... } ]`, as
/// Triton's examples write it); the parser we use wants `input: [ ... ]`. Inserts the colon where
/// a `[` follows a field name directly, outside strings and comments.
fn colon_before_lists(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let (mut in_string, mut quote, mut escaped, mut in_comment) = (false, '"', false, false);
    for c in text.chars() {
        if in_comment {
            in_comment = c != '\n';
        } else if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == quote {
                in_string = false;
            }
        } else if c == '"' || c == '\'' {
            (in_string, quote) = (true, c);
        } else if c == '#' {
            in_comment = true;
        } else if c == '[' {
            let last = out.trim_end().chars().last();
            if last.is_some_and(|l| l.is_ascii_alphanumeric() || l == '_') {
                out.truncate(out.trim_end().len());
                out.push_str(": ");
            }
        }
        out.push(c);
    }
    out
}

/// The numbered sub-folders of a model folder, ascending (other names are ignored, as Triton does).
fn version_folders(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut versions: Vec<u64> = fs::read_dir(dir)?
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str()?.parse::<u64>().ok())
        .filter(|v| *v > 0)
        .collect();
    versions.sort_unstable();
    Ok(versions)
}

/// The version that serves under the configuration's policy: the highest one selected.
pub fn select_version(config: &ModelConfig, versions: &[u64]) -> Result<u64, String> {
    if versions.is_empty() {
        return Err(
            "no version folder (a numbered folder such as 1/ holding the model files)".into(),
        );
    }
    let latest = *versions.last().unwrap_or(&0);
    let Some(policy) = &config.version_policy else {
        return Ok(latest);
    };
    if let Some(specific) = &policy.specific {
        let wanted: Vec<u64> = specific.versions.iter().map(|v| *v as u64).collect();
        return wanted
            .iter()
            .copied()
            .filter(|v| versions.contains(v))
            .max()
            .ok_or_else(|| {
                format!(
                    "version_policy.specific wants {:?} but the folder has versions {versions:?}",
                    specific.versions
                )
            });
    }
    Ok(latest)
}

/// The backend an imported model runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImportBackend {
    /// candle, from `model.safetensors`.
    Candle,
    /// ONNX Runtime, from an ONNX export of the same encoder.
    OnnxRuntime,
}

impl ImportBackend {
    pub fn name(self) -> &'static str {
        match self {
            ImportBackend::Candle => "candle",
            ImportBackend::OnnxRuntime => "onnxruntime",
        }
    }
}

/// A quantisation an import applies to the ONNX graph (`models import --quantize`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImportQuantize {
    /// Dynamic int8: weights of constant matrix products int8 per column, activations quantised
    /// at run time (`onnx::quantize`). The measured accuracy against the FP32 graph goes into
    /// the configuration.
    Int8,
}

impl ImportQuantize {
    /// Parses `--quantize`'s value; the error names the ones there are.
    pub fn parse(text: &str) -> Result<ImportQuantize, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "int8" => Ok(ImportQuantize::Int8),
            other => Err(format!("--quantize {other}: expected int8")),
        }
    }
}

/// What `import_sentence_transformers` writes.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    pub name: String,
    pub backend: ImportBackend,
    /// The ONNX export to use with [`ImportBackend::OnnxRuntime`] (copied as `model.onnx`).
    pub onnx: Option<PathBuf>,
    pub max_batch_size: u32,
    /// Replace an existing model folder's version 1.
    pub force: bool,
    /// Quantise the ONNX graph ([`ImportBackend::OnnxRuntime`] only; needs ONNX Runtime, found
    /// as the backend finds it, to measure the accuracy).
    pub quantize: Option<ImportQuantize>,
    /// `libonnxruntime.so` for the accuracy measurement (`None`: `ORT_DYLIB_PATH`).
    pub onnxruntime_library: Option<PathBuf>,
}

/// The files a sentence-transformers folder must have.
const ST_REQUIRED: [&str; 2] = ["config.json", "tokenizer.json"];
/// The files copied when present (the encoder's weights come on top, per backend).
const ST_OPTIONAL: [&str; 6] = [
    "1_Pooling/config.json",
    "modules.json",
    "sentence_bert_config.json",
    "special_tokens_map.json",
    "tokenizer_config.json",
    "vocab.txt",
];

/// Writes a ready model folder `<repository>/<name>/` (config + version 1) from a
/// sentence-transformers folder. Returns the model folder.
pub fn import_sentence_transformers(
    src: &Path,
    repository: &Path,
    options: &ImportOptions,
) -> Result<PathBuf, Error> {
    let fail = |reason: String| Error::Import {
        src: src.to_path_buf(),
        reason,
    };
    if !src.is_dir() {
        return Err(fail("not a directory".into()));
    }
    let name = options.name.as_str();
    if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
        return Err(fail(format!("'{name}' is not a valid model name")));
    }
    for f in ST_REQUIRED {
        if !src.join(f).is_file() {
            return Err(fail(format!(
                "no {f}; expected the sentence-transformers layout (config.json, model.safetensors, tokenizer.json, 1_Pooling/)"
            )));
        }
    }
    let weights: (PathBuf, &str) = match options.backend {
        ImportBackend::Candle => (src.join("model.safetensors"), "model.safetensors"),
        ImportBackend::OnnxRuntime => match &options.onnx {
            Some(p) => (p.clone(), "model.onnx"),
            None if src.join("model.onnx").is_file() => (src.join("model.onnx"), "model.onnx"),
            None if src.join("onnx/model.onnx").is_file() => {
                (src.join("onnx/model.onnx"), "model.onnx")
            }
            None => {
                return Err(fail(
                    "the onnxruntime backend needs an ONNX export of the encoder: pass --onnx FILE (testdata/minilm_onnx.py writes one)".into(),
                ));
            }
        },
    };
    if !weights.0.is_file() {
        return Err(fail(format!("no {}", weights.0.display())));
    }
    if options.quantize.is_some() && options.backend != ImportBackend::OnnxRuntime {
        return Err(fail(
            "--quantize int8 rewrites an ONNX graph: it needs --backend onnxruntime".into(),
        ));
    }
    let model_dir = repository.join(name);
    let version_dir = model_dir.join("1");
    if version_dir.exists() {
        if !options.force {
            return Err(fail(format!(
                "{} exists; pass --force to replace it",
                version_dir.display()
            )));
        }
        fs::remove_dir_all(&version_dir)
            .map_err(|e| fail(format!("cannot replace {}: {e}", version_dir.display())))?;
    }
    let io = |what: &Path, e: std::io::Error| fail(format!("{}: {e}", what.display()));
    fs::create_dir_all(&version_dir).map_err(|e| io(&version_dir, e))?;
    let mut files: Vec<(PathBuf, PathBuf)> = ST_REQUIRED
        .iter()
        .chain(ST_OPTIONAL.iter())
        .map(|f| (src.join(f), version_dir.join(f)))
        .filter(|(from, _)| from.is_file())
        .collect();
    files.push((weights.0.clone(), version_dir.join(weights.1)));
    for (from, to) in &files {
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        }
        fs::copy(from, to).map_err(|e| io(from, e))?;
    }
    let mut config = ModelConfig {
        name: name.to_string(),
        backend: options.backend.name().to_string(),
        max_batch_size: options.max_batch_size,
        dynamic_batching: Some(Default::default()),
        load_on_demand: true,
        // One short random sentence before READY: the first real request then pays no
        // one-time costs (allocator warm-up, ONNX Runtime's first-run optimisations).
        model_warmup: vec![ModelWarmup {
            name: "sentence".into(),
            batch_size: 1,
            count: 1,
            inputs: [(
                "TEXT".to_string(),
                WarmupInput {
                    data_type: "TYPE_STRING".into(),
                    dims: vec![1],
                    random_data: true,
                    ..Default::default()
                },
            )]
            .into(),
        }],
        ..Default::default()
    };
    config.parameters.insert(
        "imported_from".into(),
        Parameter {
            string_value: src.display().to_string(),
        },
    );
    if let Some(ImportQuantize::Int8) = options.quantize {
        // A failed quantisation leaves no half-written version behind.
        let done = quantize_version(&version_dir, &weights.0, options, &mut config);
        if let Err(reason) = done {
            let _ = fs::remove_dir_all(&version_dir);
            return Err(fail(reason));
        }
    }
    let config_path = model_dir.join(CONFIG_FILE);
    let text = serde_json::to_string_pretty(&config)
        .map_err(|e| fail(format!("cannot write the config: {e}")))?;
    fs::write(&config_path, text + "\n").map_err(|e| io(&config_path, e))?;
    Ok(model_dir)
}

/// Replaces `version_dir/model.onnx` (the FP32 graph `source`, copied there) with its int8
/// rewrite, and records what was done and the measured accuracy in `config`'s parameters.
#[cfg(feature = "onnx")]
fn quantize_version(
    version_dir: &Path,
    source: &Path,
    options: &ImportOptions,
    config: &mut ModelConfig,
) -> Result<(), String> {
    use crate::onnx::quantize;
    const CANDIDATE: &str = ".model.int8.onnx";
    let bytes = fs::read(source).map_err(|e| format!("{}: {e}", source.display()))?;
    let q = quantize::quantize_int8(&bytes).map_err(|e| format!("{}: {e}", source.display()))?;
    let candidate = version_dir.join(CANDIDATE);
    fs::write(&candidate, &q.bytes).map_err(|e| format!("{}: {e}", candidate.display()))?;
    let onnx = crate::onnx::OnnxOptions {
        library: options.onnxruntime_library.clone(),
        ..Default::default()
    };
    let accuracy = quantize::measure(version_dir, "model.onnx", CANDIDATE, &onnx)
        .map_err(|e| format!("measuring the int8 graph against the FP32 one: {e}"))?;
    let target = version_dir.join("model.onnx");
    fs::rename(&candidate, &target).map_err(|e| format!("{}: {e}", target.display()))?;
    let matmuls = format!("{} of {}", q.matmuls, q.matmuls_total);
    for (key, value) in [
        (quantize::PARAM_QUANTIZATION, "int8".to_string()),
        (quantize::PARAM_MATMULS, matmuls),
    ]
    .into_iter()
    .chain(accuracy.parameters())
    {
        config.parameters.insert(
            key.into(),
            Parameter {
                string_value: value,
            },
        );
    }
    Ok(())
}

#[cfg(not(feature = "onnx"))]
fn quantize_version(
    _: &Path,
    _: &Path,
    _: &ImportOptions,
    _: &mut ModelConfig,
) -> Result<(), String> {
    Err("--quantize needs the ONNX Runtime backend, which this build does not have".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "veraltheim-repo-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    #[test]
    fn reads_models_versions_and_policies() {
        let root = tmp("read");
        write(
            &root.join("a/config.json"),
            r#"{"backend":"builtin","max_batch_size":4,"input":[{"name":"INPUT0","data_type":"TYPE_FP32","dims":[-1]}]}"#,
        );
        for v in ["1", "3", "10", "notes"] {
            fs::create_dir_all(root.join("a").join(v)).unwrap();
        }
        write(
            &root.join("b/config.json"),
            r#"{"name":"b","backend":"onnxruntime","version_policy":{"specific":{"versions":[1,3]}}}"#,
        );
        for v in ["1", "2", "3", "4"] {
            fs::create_dir_all(root.join("b").join(v)).unwrap();
        }
        fs::create_dir_all(root.join(".hidden")).unwrap();
        write(&root.join("README"), "not a model");
        let repo = Repository::new(&root);
        assert_eq!(repo.names().unwrap(), ["a", "b"]);
        let a = repo.model("a").unwrap();
        assert_eq!(a.config.name, "a");
        assert_eq!(a.versions, [1, 3, 10]);
        assert_eq!(a.serving, 10);
        assert_eq!(a.version_dir(), root.join("a/10"));
        let b = repo.model("b").unwrap();
        assert_eq!(b.serving, 3);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn list_fields_get_their_colon_outside_strings_and_comments() {
        assert_eq!(colon_before_lists("input [ {} ]"), "input: [ {} ]");
        assert_eq!(colon_before_lists("dims: [ 1 ]"), "dims: [ 1 ]");
        assert_eq!(
            colon_before_lists("s: \"a [b\" # c [d\nx\n[1]"),
            "s: \"a [b\" # c [d\nx: [1]"
        );
    }

    #[test]
    fn reads_tritons_config_pbtxt() {
        let root = tmp("pbtxt");
        write(
            &root.join("triton/config.pbtxt"),
            r#"
# A Triton model configuration, as Triton users write it.
name: "triton"
backend: "onnxruntime"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 16 ] } ]
dynamic_batching { preferred_batch_size: [ 4, 8 ] max_queue_delay_microseconds: 100 }
instance_group [ { count: 2 kind: KIND_CPU } ]
version_policy: { specific: { versions: [ 1 ] } }
parameters { key: "intra_op_threads" value: { string_value: "1" } }
model_warmup [ { name: "w" batch_size: 2 inputs { key: "INPUT0" value: { data_type: TYPE_FP32 dims: [ 16 ] zero_data: true } } } ]
optimization { execution_accelerators { cpu_execution_accelerator: [ { name: "openvino" } ] } }
"#,
        );
        for v in ["1", "2"] {
            fs::create_dir_all(root.join("triton").join(v)).unwrap();
        }
        let m = Repository::new(&root).model("triton").unwrap();
        let c = &m.config;
        assert_eq!(
            (c.name.as_str(), c.backend.as_str(), c.max_batch_size),
            ("triton", "onnxruntime", 8)
        );
        assert_eq!(c.input[0].data_type, "TYPE_FP32");
        assert_eq!(c.output[0].dims, vec![16]);
        let db = c.dynamic_batching.as_ref().unwrap();
        assert_eq!(
            (
                db.preferred_batch_size.clone(),
                db.max_queue_delay_microseconds
            ),
            (vec![4, 8], 100)
        );
        assert_eq!(
            (c.instance_group[0].count, c.instance_group[0].kind.as_str()),
            (2, "KIND_CPU")
        );
        assert_eq!(c.parameter("intra_op_threads"), Some("1"));
        assert_eq!(c.model_warmup[0].batch_size, 2);
        assert!(c.model_warmup[0].inputs["INPUT0"].zero_data);
        assert_eq!(m.serving, 1);
        // Errors name the file and the place.
        write(
            &root.join("bad/config.pbtxt"),
            "max_batch_size: \"eight\"\n",
        );
        fs::create_dir_all(root.join("bad/1")).unwrap();
        let e = Repository::new(&root).model("bad").unwrap_err().to_string();
        assert!(e.contains("config.pbtxt"), "{e}");
        write(&root.join("bad/config.pbtxt"), "max_batch_siz: 8\n");
        let e = Repository::new(&root).model("bad").unwrap_err().to_string();
        assert!(e.contains("max_batch_siz"), "{e}");
        write(&root.join("bad/config.json"), "{}");
        let e = Repository::new(&root).model("bad").unwrap_err().to_string();
        assert!(e.contains("keep one"), "{e}");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn bad_folders_say_what_is_wrong() {
        let root = tmp("bad");
        write(&root.join("noconfig/1/x"), "");
        write(&root.join("badjson/config.json"), "{nope");
        write(&root.join("renamed/config.json"), r#"{"name":"other"}"#);
        fs::create_dir_all(root.join("renamed/1")).unwrap();
        write(&root.join("noversion/config.json"), "{}");
        write(
            &root.join("missing/config.json"),
            r#"{"version_policy":{"specific":{"versions":[7]}}}"#,
        );
        fs::create_dir_all(root.join("missing/1")).unwrap();
        let repo = Repository::new(&root);
        let msg = |n: &str| repo.model(n).unwrap_err().to_string();
        assert!(
            msg("noconfig").contains("cannot read config.json"),
            "{}",
            msg("noconfig")
        );
        assert!(
            msg("badjson").contains("not valid JSON"),
            "{}",
            msg("badjson")
        );
        assert!(msg("renamed").contains("'other'"), "{}", msg("renamed"));
        assert!(
            msg("noversion").contains("no version folder"),
            "{}",
            msg("noversion")
        );
        assert!(msg("missing").contains("[7]"), "{}", msg("missing"));
        assert!(matches!(
            repo.model("ghost"),
            Err(Error::NotInRepository { .. })
        ));
        assert!(matches!(
            repo.model("../x"),
            Err(Error::NotInRepository { .. })
        ));
        let scanned = repo.scan().unwrap();
        assert_eq!(scanned.len(), 5);
        assert!(scanned.iter().all(|r| r.is_err()));
        assert!(
            Repository::new(root.join("absent"))
                .names()
                .unwrap()
                .is_empty()
        );
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn symlinks_out_of_the_repository_are_refused_and_inside_it_allowed() {
        use std::os::unix::fs::symlink;
        let root = tmp("symlinks");
        let outside = tmp("symlinks-outside");
        write(&outside.join("secret"), "root only");
        fs::create_dir_all(outside.join("1")).unwrap();
        write(
            &outside.join("config.json"),
            r#"{"backend":"builtin","parameters":{"builtin":{"string_value":"identity"}}}"#,
        );
        let config =
            r#"{"backend":"builtin","parameters":{"builtin":{"string_value":"identity"}}}"#;
        // A model file that points outside.
        write(&root.join("file/config.json"), config);
        fs::create_dir_all(root.join("file/1")).unwrap();
        symlink(outside.join("secret"), root.join("file/1/model.onnx")).unwrap();
        // A version folder that points outside.
        write(&root.join("version/config.json"), config);
        symlink(outside.join("1"), root.join("version/1")).unwrap();
        // The model folder itself.
        symlink(&outside, root.join("folder")).unwrap();
        let repo = Repository::new(&root);
        for name in ["file", "version", "folder"] {
            let e = repo.model(name).unwrap_err();
            assert!(
                matches!(e, Error::InvalidModelFolder { .. })
                    && e.to_string().contains("outside the model repository"),
                "{name}: {e}"
            );
            assert_eq!(e.kind(), crate::ErrorKind::InvalidArgument, "{name}: {e}");
        }
        // Inside the repository a symlink is fine (a file shared between versions).
        write(&root.join("shared/config.json"), config);
        write(&root.join("shared/1/model.onnx"), "weights");
        fs::create_dir_all(root.join("shared/2")).unwrap();
        symlink(
            root.join("shared/1/model.onnx"),
            root.join("shared/2/model.onnx"),
        )
        .unwrap();
        assert_eq!(repo.model("shared").unwrap().serving, 2);
        fs::remove_dir_all(&root).unwrap();
        fs::remove_dir_all(&outside).unwrap();
    }

    #[test]
    fn import_writes_a_ready_folder_and_refuses_to_overwrite() {
        let src = tmp("st");
        write(&src.join("config.json"), r#"{"hidden_size": 4}"#);
        write(&src.join("tokenizer.json"), "{}");
        write(&src.join("model.safetensors"), "weights");
        write(
            &src.join("1_Pooling/config.json"),
            r#"{"pooling_mode_mean_tokens": true}"#,
        );
        let repo = tmp("repo");
        let options = ImportOptions {
            name: "mini".into(),
            backend: ImportBackend::Candle,
            onnx: None,
            max_batch_size: 32,
            force: false,
            quantize: None,
            onnxruntime_library: None,
        };
        let dir = import_sentence_transformers(&src, &repo, &options).unwrap();
        assert_eq!(dir, repo.join("mini"));
        for f in [
            "1/config.json",
            "1/tokenizer.json",
            "1/model.safetensors",
            "1/1_Pooling/config.json",
        ] {
            assert!(dir.join(f).is_file(), "{f} missing");
        }
        let m = Repository::new(&repo).model("mini").unwrap();
        assert_eq!(m.config.backend, "candle");
        assert_eq!(m.config.max_batch_size, 32);
        assert!(m.config.load_on_demand);
        assert_eq!(m.config.model_warmup.len(), 1);
        assert_eq!(m.serving, 1);
        let err = import_sentence_transformers(&src, &repo, &options).unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");
        let forced = ImportOptions {
            force: true,
            ..options.clone()
        };
        import_sentence_transformers(&src, &repo, &forced).unwrap();
        let onnx = ImportOptions {
            backend: ImportBackend::OnnxRuntime,
            force: true,
            ..options
        };
        let err = import_sentence_transformers(&src, &repo, &onnx).unwrap_err();
        assert!(err.to_string().contains("--onnx"), "{err}");
        let int8_on_candle = ImportOptions {
            quantize: Some(ImportQuantize::Int8),
            ..forced.clone()
        };
        let err = import_sentence_transformers(&src, &repo, &int8_on_candle).unwrap_err();
        assert!(
            err.to_string().contains("needs --backend onnxruntime"),
            "{err}"
        );
        assert_eq!(ImportQuantize::parse(" INT8 "), Ok(ImportQuantize::Int8));
        let err = ImportQuantize::parse("int4").unwrap_err();
        assert!(
            err.contains("int4") && err.contains("expected int8"),
            "{err}"
        );
        let err = import_sentence_transformers(&repo, &repo, &forced).unwrap_err();
        assert!(
            err.to_string().contains("sentence-transformers layout"),
            "{err}"
        );
        fs::remove_dir_all(&src).unwrap();
        fs::remove_dir_all(&repo).unwrap();
    }
}
