//! The settings, read off the default file: each key of `default.toml` is declared there once,
//! with its default (or, commented out, an example of a setting unset by default), its
//! description, and its flag in parentheses at the end of the description. From that one
//! declaration come the `serve` flag (its `--help` is the description), the environment
//! variable (`VERALTHEIM_` and the flag in capitals, `_` for `-`) and the key the value lands on.
//! A flag's or variable's text becomes a TOML value of the type of the key's default (or
//! example), and is merged into the file's table before the one typed read of [`super::Config`],
//! so a value from a flag is checked exactly as one from the file.
//!
//! The file is embedded, so a malformed declaration is a bug that the tests below catch; at run
//! time [`settings`] trusts it.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::OnceLock;

use clap::{Arg, ArgAction, ArgMatches, Command};

use super::DEFAULT_TOML;

/// How a flag's or environment variable's text becomes the key's TOML value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Text,
    Integer,
    Float,
    Bool,
    /// Comma-separated strings (a flag may be repeated), or a whole TOML array.
    List,
}

/// One setting, as `default.toml` declares it.
#[derive(Clone, Debug)]
pub struct Setting {
    /// The dotted key in the file, e.g. `server.grpc_addr`.
    pub key: String,
    /// The flag of `serve`, without its dashes, e.g. `grpc-addr`.
    pub flag: String,
    /// The environment variable, e.g. `VERALTHEIM_GRPC_ADDR`.
    pub env: String,
    /// The description above the key, without the flag note.
    pub doc: String,
    pub kind: Kind,
    /// The default; `None` for a key that is unset by default (commented out in the file).
    pub default: Option<toml::Value>,
}

/// Every setting, in the file's order.
pub fn settings() -> &'static [Setting] {
    static SETTINGS: OnceLock<Vec<Setting>> = OnceLock::new();
    SETTINGS.get_or_init(|| match parse(DEFAULT_TOML) {
        Ok(settings) => settings,
        // The embedded file is tested; this cannot happen in a build that passed its tests.
        Err(e) => panic!("the embedded default configuration is malformed: {e}"),
    })
}

/// The environment variable of the `--config` flag.
pub const CONFIG_ENV: &str = "VERALTHEIM_CONFIG";

/// Reads the settings off a configuration file's text (see the module documentation).
fn parse(text: &str) -> Result<Vec<Setting>, String> {
    let table: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut settings: Vec<Setting> = Vec::new();
    let mut section = String::new();
    // Inside a `[[...]]` table: its keys are fields of one entry of the list, not settings.
    let mut in_list = false;
    let mut comments: Vec<&str> = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        let at = |what: String| format!("line {}: {what}", number + 1);
        if line.is_empty() {
            comments.clear();
        } else if let Some(header) = line.strip_prefix("[[") {
            let name = header.trim_end_matches("]]").trim().to_string();
            if !settings.iter().any(|s| s.key == name) {
                let default = lookup(&table, &name).cloned();
                settings.push(setting(&name, &comments, default, None).map_err(at)?);
            }
            (section, in_list) = (name, true);
            comments.clear();
        } else if let Some(header) = line.strip_prefix('[') {
            section = header.trim_end_matches(']').trim().to_string();
            in_list = false;
            comments.clear();
        } else if let Some(comment) = line.strip_prefix('#') {
            let comment = comment.trim();
            // `# key = example` after a description with a flag note: a setting unset by default.
            match commented_key(comment) {
                Some((name, example)) if !in_list && flag_note(&comments).is_some() => {
                    let key = dotted(&section, name);
                    settings.push(setting(&key, &comments, None, Some(example)).map_err(at)?);
                    comments.clear();
                }
                _ => comments.push(comment),
            }
        } else if !in_list {
            let name = line
                .split_once('=')
                .map(|(name, _)| name.trim())
                .ok_or_else(|| at(format!("'{line}' is neither a key, a header nor a comment")))?;
            let key = dotted(&section, name);
            let default = lookup(&table, &key).cloned();
            settings.push(setting(&key, &comments, default, None).map_err(at)?);
            comments.clear();
        }
    }
    let mut flags = HashSet::new();
    if let Some(twice) = settings.iter().find(|s| !flags.insert(s.flag.as_str())) {
        return Err(format!("the flag --{} is declared twice", twice.flag));
    }
    Ok(settings)
}

fn dotted(section: &str, name: &str) -> String {
    if section.is_empty() {
        name.to_string()
    } else {
        format!("{section}.{name}")
    }
}

fn lookup<'a>(table: &'a toml::Table, key: &str) -> Option<&'a toml::Value> {
    let (parents, last) = match key.rsplit_once('.') {
        Some((parents, last)) => (Some(parents), last),
        None => (None, key),
    };
    let mut t = table;
    for part in parents.into_iter().flat_map(|p| p.split('.')) {
        t = t.get(part)?.as_table()?;
    }
    t.get(last)
}

/// `name = value` where value is a TOML value: a commented-out key.
fn commented_key(comment: &str) -> Option<(&str, toml::Value)> {
    let (name, value) = comment.split_once(" = ")?;
    let name = name.trim();
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return None;
    }
    let value = toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()?
        .remove("v")?;
    Some((name, value))
}

/// The flag named by `(--flag)` at the end of a description.
fn flag_note(comments: &[&str]) -> Option<String> {
    let last = comments.last()?;
    let start = last.rfind("(--")? + 3;
    let flag: String = last[start..]
        .chars()
        .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')
        .collect();
    (last[start + flag.len()..].starts_with(')') && !flag.is_empty()).then_some(flag)
}

fn setting(
    key: &str,
    comments: &[&str],
    default: Option<toml::Value>,
    example: Option<toml::Value>,
) -> Result<Setting, String> {
    let flag = flag_note(comments)
        .ok_or_else(|| format!("{key}: its description must end with its flag, as '(--name)'"))?;
    let kind = match default.as_ref().or(example.as_ref()) {
        Some(toml::Value::String(_)) => Kind::Text,
        Some(toml::Value::Integer(_)) => Kind::Integer,
        Some(toml::Value::Float(_)) => Kind::Float,
        Some(toml::Value::Boolean(_)) => Kind::Bool,
        Some(toml::Value::Array(_)) => Kind::List,
        other => return Err(format!("{key}: no value of a supported type ({other:?})")),
    };
    let mut doc = comments.join(" ");
    if let Some(note) = doc.rfind("(--") {
        doc.truncate(note);
    }
    Ok(Setting {
        key: key.to_string(),
        env: format!("VERALTHEIM_{}", flag.to_uppercase().replace('-', "_")),
        flag,
        doc: doc.trim_end().to_string(),
        kind,
        default,
    })
}

impl Setting {
    /// The value that `raw` (a flag's occurrences, or an environment variable) gives the key.
    pub fn value(&self, raw: &[String]) -> Result<toml::Value, String> {
        let one = || raw.last().map(|s| s.trim()).unwrap_or_default();
        Ok(match self.kind {
            Kind::Text => toml::Value::String(one().to_string()),
            Kind::Integer => toml::Value::Integer(
                one()
                    .parse()
                    .map_err(|_| format!("'{}' is not a whole number", one()))?,
            ),
            Kind::Float => toml::Value::Float(
                one()
                    .parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite())
                    .ok_or_else(|| format!("'{}' is not a number", one()))?,
            ),
            Kind::Bool => toml::Value::Boolean(match one().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" => true,
                "false" | "0" | "no" => false,
                other => return Err(format!("'{other}' is not true or false")),
            }),
            Kind::List if raw.len() == 1 && one().starts_with('[') => {
                toml::from_str::<toml::Table>(&format!("v = {}", one()))
                    .ok()
                    .and_then(|mut t| t.remove("v"))
                    .ok_or_else(|| format!("'{}' is not a TOML array", one()))?
            }
            Kind::List => toml::Value::Array(
                raw.iter()
                    .flat_map(|r| r.split(','))
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| toml::Value::String(s.to_string()))
                    .collect(),
            ),
        })
    }

    fn arg(&'static self) -> Arg {
        let value_name = match self.kind {
            Kind::Text => "TEXT",
            Kind::Integer => "INTEGER",
            Kind::Float => "NUMBER",
            Kind::Bool => "BOOL",
            Kind::List => "LIST",
        };
        let default = match &self.default {
            Some(v) => format!("[default: {v}]"),
            None => "[default: unset]".to_string(),
        };
        let arg = Arg::new(self.flag.as_str())
            .long(self.flag.as_str())
            .value_name(value_name)
            .help(format!("{} {default} [env: {}]", self.doc, self.env))
            .allow_negative_numbers(true);
        match self.kind {
            // `--allow-client-shm` alone means true.
            Kind::Bool => arg
                .num_args(0..=1)
                .default_missing_value("true")
                .action(ArgAction::Set),
            Kind::List => arg.action(ArgAction::Append),
            _ => arg.action(ArgAction::Set),
        }
    }
}

/// `serve`'s command line: `--config` and a flag per setting (see the module documentation).
#[derive(Clone, Debug, Default)]
pub struct ServeArgs {
    /// The configuration file.
    pub config: Option<PathBuf>,
    /// The settings given as flags, with their occurrences' text.
    pub flags: Vec<(&'static Setting, Vec<String>)>,
}

impl ServeArgs {
    /// The command line as given by a test: `args` without the program's name.
    #[cfg(test)]
    pub fn parse<I: AsRef<str>>(args: &[I]) -> Result<ServeArgs, clap::Error> {
        use clap::FromArgMatches;
        let cmd = <ServeArgs as clap::Args>::augment_args(Command::new("serve"));
        let matches = cmd.try_get_matches_from(
            std::iter::once("serve").chain(args.iter().map(|a| a.as_ref())),
        )?;
        ServeArgs::from_arg_matches(&matches)
    }
}

impl clap::FromArgMatches for ServeArgs {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let config = matches.get_one::<OsString>("config").map(PathBuf::from);
        let flags = settings()
            .iter()
            .filter_map(|s| {
                let values = matches.get_many::<String>(s.flag.as_str())?;
                Some((s, values.cloned().collect()))
            })
            .collect();
        Ok(ServeArgs { config, flags })
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

impl clap::Args for ServeArgs {
    fn augment_args(cmd: Command) -> Command {
        let config = Arg::new("config")
            .long("config")
            .value_name("FILE")
            .value_parser(clap::value_parser!(OsString))
            .help(format!(
                "TOML configuration file (see `veraltheim config default`). [env: {CONFIG_ENV}]"
            ));
        settings()
            .iter()
            .fold(cmd.arg(config), |cmd, s| cmd.arg(s.arg()))
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_file_declares_each_setting_once_with_a_flag() {
        let all = settings();
        let find = |key: &str| all.iter().find(|s| s.key == key).unwrap();
        let s = find("server.grpc_addr");
        assert_eq!(
            (s.flag.as_str(), s.env.as_str(), s.kind),
            ("grpc-addr", "VERALTHEIM_GRPC_ADDR", Kind::Text)
        );
        assert_eq!(
            s.doc,
            "gRPC: veraltheim.v1 and the KServe v2 / Triton protocol on one port."
        );
        let s = find("models.cpu_memory_bytes");
        assert_eq!((s.kind, s.default.is_none()), (Kind::Integer, true));
        let s = find("jobs.queues");
        assert_eq!((s.flag.as_str(), s.kind), ("job-queues", Kind::List));
        assert!(s.default.is_some());
        // The fields of a [[jobs.queues]] entry are not settings of their own.
        assert!(all.iter().all(|s| !s.key.starts_with("jobs.queues.")));
        assert_eq!(
            find("jobs.kubernetes.api_retries").flag,
            "kubernetes-api-retries"
        );
    }

    #[test]
    fn a_key_without_a_flag_or_a_flag_declared_twice_is_refused() {
        let e = parse("[a]\n# No flag here.\nx = 1\n").unwrap_err();
        assert!(e.contains("a.x") && e.contains("(--name)"), "{e}");
        let e = parse("[a]\n# One.  (--x)\nx = 1\n# Two.  (--x)\ny = 2\n").unwrap_err();
        assert!(e.contains("--x is declared twice"), "{e}");
        // A comment that only looks like a key, without a flag note, stays a comment.
        let s = parse("[a]\n# e.g.\n# effect = \"x\"\n# Real.  (--y)\ny = 2\n").unwrap();
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn flag_text_becomes_a_value_of_the_keys_type() {
        let find = |key: &str| settings().iter().find(|s| s.key == key).unwrap();
        let v = |key: &str, raw: &[&str]| {
            find(key).value(&raw.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        };
        assert_eq!(
            v("server.shutdown_grace_seconds", &["7"]),
            Ok(toml::Value::Integer(7))
        );
        assert!(
            v("server.shutdown_grace_seconds", &["soon"])
                .unwrap_err()
                .contains("soon")
        );
        assert_eq!(v("models.size_factor", &["2"]), Ok(toml::Value::Float(2.0)));
        assert_eq!(
            v("server.allow_client_shm", &["1"]),
            Ok(toml::Value::Boolean(true))
        );
        let list = v("models.load", &["a,b", "c"]).unwrap();
        assert_eq!(list.as_array().map(Vec::len), Some(3));
        let queues = v("jobs.queues", &[r#"[{ name = "q", weight = 2 }]"#]).unwrap();
        assert_eq!(queues.as_array().map(Vec::len), Some(1));
    }
}
