//! What a sentence-transformers folder declares beside the weights: its module list
//! (`modules.json`: where the pooling lives, whether a `Normalize` module follows) and the token
//! limit (`sentence_bert_config.json`, `config.json`).

use std::path::Path;

use super::DEFAULT_MAX_SEQ_LENGTH;

/// Reads a JSON file; `Ok(None)` when it does not exist.
pub(super) fn read_json(file: &Path) -> Result<Option<serde_json::Value>, String> {
    match std::fs::read_to_string(file) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| format!("{} is not valid JSON: {e}", file.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", file.display())),
    }
}

/// The module list of a sentence-transformers folder (`modules.json`); empty when absent.
pub(super) struct Modules(Vec<(String, String)>);

impl Modules {
    pub(super) fn read(dir: &Path) -> Result<Modules, String> {
        let file = dir.join("modules.json");
        let Some(value) = read_json(&file)? else {
            return Ok(Modules(Vec::new()));
        };
        let Some(list) = value.as_array() else {
            return Err(format!("{} is not a JSON array of modules", file.display()));
        };
        let mut modules = Vec::with_capacity(list.len());
        for (i, module) in list.iter().enumerate() {
            let Some(kind) = module.get("type").and_then(|t| t.as_str()) else {
                return Err(format!(
                    "{}: module {i} has no \"type\" string",
                    file.display()
                ));
            };
            let path = module.get("path").and_then(|p| p.as_str()).unwrap_or("");
            modules.push((kind.to_string(), path.to_string()));
        }
        Ok(Modules(modules))
    }

    fn contains(&self, kind: &str) -> bool {
        self.0.iter().any(|(k, _)| k == kind)
    }

    /// The folder of the module of `kind`, when it is a plain relative path inside the model's
    /// folder (no `..`, not absolute): a `modules.json` cannot point a read outside it.
    pub(super) fn path_of(&self, kind: &str) -> Option<String> {
        self.0
            .iter()
            .find(|(k, p)| k == kind && !p.is_empty())
            .map(|(_, p)| p.clone())
            .filter(|p| {
                std::path::Path::new(p).components().all(|c| {
                    matches!(
                        c,
                        std::path::Component::Normal(_) | std::path::Component::CurDir
                    )
                })
            })
    }
}

/// Whether the folder's `modules.json` lists a `sentence_transformers.models.Normalize` module
/// (false when there is no `modules.json`).
pub fn normalize_from_modules(dir: &Path) -> Result<bool, String> {
    Ok(Modules::read(dir)?.contains("sentence_transformers.models.Normalize"))
}

/// The token limit of a model folder: `max_seq_length` of `sentence_bert_config.json` when
/// present, else `max_position_embeddings` of `config.json`, else [`DEFAULT_MAX_SEQ_LENGTH`];
/// never more than `max_position_embeddings` (the encoder has no positions beyond it).
pub fn max_seq_length_from_dir(dir: &Path) -> Result<usize, String> {
    let positive = |file: &Path, key: &str| -> Result<Option<usize>, String> {
        let Some(value) = read_json(file)? else {
            return Ok(None);
        };
        match value.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => Ok(Some(n as usize)),
                _ => Err(format!(
                    "{}: {key} is {v}, not a positive integer",
                    file.display()
                )),
            },
        }
    };
    let sbert = positive(&dir.join("sentence_bert_config.json"), "max_seq_length")?;
    let positions = positive(&dir.join("config.json"), "max_position_embeddings")?;
    Ok(match (sbert, positions) {
        (Some(s), Some(p)) => s.min(p),
        (Some(s), None) => s,
        (None, Some(p)) => p,
        (None, None) => DEFAULT_MAX_SEQ_LENGTH,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_module_path_out_of_the_folder_is_not_followed() {
        let kind = "sentence_transformers.models.Pooling";
        let modules = |p: &str| Modules(vec![(kind.to_string(), p.to_string())]);
        assert_eq!(
            modules("1_Pooling").path_of(kind).as_deref(),
            Some("1_Pooling")
        );
        assert_eq!(modules("a/b").path_of(kind).as_deref(), Some("a/b"));
        assert_eq!(modules("./2_P").path_of(kind).as_deref(), Some("./2_P"));
        for escape in ["../../etc", "/etc", "a/../../b", "./x/../.."] {
            assert_eq!(modules(escape).path_of(kind), None, "{escape}");
        }
    }
}
