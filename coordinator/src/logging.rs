//! The log: its subscriber, the settings a caller may change while the server runs, and its
//! writer.
//!
//! **Settings at run time.** The filter sits behind `tracing-subscriber`'s reload layer and the
//! lines pass a gate of three switches (info, warning, error), so KServe's `LogSettings` can
//! read and change them as Triton's does ([`LogControl`]). The mapping from Triton's settings:
//!
//! | Triton setting      | here |
//! |---------------------|------|
//! | `log_verbose_level` | 0: no debug or trace lines; 1: `debug`; 2 and more: `trace`, for every target. Read from the filter in effect: `--log-level debug` answers 1. Setting the level the `--log-level` filter has brings that filter back (with its per-target directives); another level replaces it with the plain level. |
//! | `log_info`, `log_warning`, `log_error` | whether lines of that level are written. Each answers true only when its switch is on *and* the filter lets that level through (`--log-level warn` answers `log_info` false). Switching one on under a filter that stops its level raises the filter to that level for every target. |
//! | `log_format`        | `text` or `json` (`--log-format`), fixed at start: setting the one in effect is accepted, another is refused. |
//! | `log_file`          | always empty: the log goes to stderr. Setting it to anything but empty is refused. |
//!
//! An update is checked whole before anything changes: a bad name, a value of the wrong type or
//! a setting that cannot be changed refuses it all, naming the setting.
//!
//! **The writer.** Lines go to stderr, and a line that cannot be written (the reader of a pipe
//! went away, the disk under a redirected log is full) is dropped and counted, never retried,
//! reported on stderr or turned into a panic. Logging must not take the server down (issue 18,
//! case 1): the stock writer's fallback reports a failed write with `eprintln!`, which panics
//! when stderr itself fails, and a panic while logging aborted the process.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use tracing::{Level, Metadata, Subscriber};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, Filter, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

use crate::config::LogFormat;

/// The control of the process's log, once [`init`] has installed it.
static CONTROL: OnceLock<LogControl> = OnceLock::new();

/// Installs the process's log: `level` is a tracing filter (`info`, `veraltheim=debug,…`; one
/// that does not parse logs at `info`), lines go to stderr as `format` says. The settings can then
/// be read and changed through [`control`]. Call once, first thing.
pub fn init(format: LogFormat, level: &str) {
    let (subscriber, control) = build(format, level, LossyStderrWriter);
    if tracing::subscriber::set_global_default(subscriber).is_ok() {
        let _ = CONTROL.set(control);
    }
}

/// The log's settings, when [`init`] installed the log.
pub fn control() -> Option<&'static LogControl> {
    CONTROL.get()
}

type Subscribed = Box<dyn Subscriber + Send + Sync>;

/// The subscriber (reloadable filter, the level gate, the fmt layer writing to `writer`) and its
/// control.
fn build<W>(format: LogFormat, level: &str, writer: W) -> (Subscribed, LogControl)
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let levels = Levels::new(level);
    let (filter, handle) = reload::Layer::new(levels.filter());
    let gate = LevelGate::default();
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        // The fallback that reports a failed write with eprintln! (a panic when stderr is
        // gone); LossyStderr counts the line instead.
        .log_internal_errors(false);
    let registry = tracing_subscriber::registry().with(filter);
    let subscriber: Subscribed = match format {
        LogFormat::Json => Box::new(registry.with(fmt.json().with_filter(gate.clone()))),
        LogFormat::Text => Box::new(registry.with(fmt.with_filter(gate.clone()))),
    };
    let control = LogControl {
        format,
        reload: handle,
        gate,
        levels: Mutex::new(levels),
    };
    (subscriber, control)
}

/// Reads and changes the log's settings while the server runs (see the module documentation
/// for the mapping from Triton's settings).
pub struct LogControl {
    format: LogFormat,
    reload: reload::Handle<EnvFilter, Registry>,
    gate: LevelGate,
    levels: Mutex<Levels>,
}

/// The log's settings, as Triton names them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogSettings {
    pub verbose_level: u32,
    pub info: bool,
    pub warning: bool,
    pub error: bool,
    /// `text` or `json`.
    pub format: &'static str,
    /// Always empty: the log goes to stderr.
    pub file: &'static str,
}

/// A setting's value in an update, as the request carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogValue {
    Bool(bool),
    Uint(u32),
    Text(String),
    /// The request names the setting without a value.
    Missing,
}

/// Why an update was refused (nothing was changed).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LogSettingsError {
    #[error(
        "unknown log setting '{0}' (known: log_verbose_level, log_info, log_warning, log_error, log_format, log_file)"
    )]
    Unknown(String),
    #[error("log setting '{name}' needs {wanted}, got {got}")]
    WrongType {
        name: String,
        wanted: &'static str,
        got: String,
    },
    #[error(
        "log setting 'log_format' cannot be changed while the server runs: it is '{current}' (--log-format), got '{asked}'"
    )]
    Format {
        current: &'static str,
        asked: String,
    },
    #[error("log setting 'log_file' cannot be set: the log goes to stderr (got '{0}')")]
    File(String),
    #[error("the log can no longer be changed: {0}")]
    Gone(String),
}

impl LogControl {
    /// The settings in effect.
    pub fn settings(&self) -> LogSettings {
        self.levels.lock().settings(self.format)
    }

    /// Applies the `changes` (Triton's names) all together, or none of them; returns the
    /// settings in effect afterwards.
    pub fn update(&self, changes: &[(String, LogValue)]) -> Result<LogSettings, LogSettingsError> {
        let mut levels = self.levels.lock();
        let next = levels.updated(changes, self.format)?;
        if next.directive != levels.directive {
            self.reload
                .reload(next.filter())
                .map_err(|e| LogSettingsError::Gone(e.to_string()))?;
        }
        self.gate.set(&next);
        *levels = next;
        let settings = levels.settings(self.format);
        tracing::info!(
            verbose_level = settings.verbose_level,
            info = settings.info,
            warning = settings.warning,
            error = settings.error,
            filter = %levels.directive,
            "log settings changed"
        );
        Ok(settings)
    }
}

fn format_name(format: LogFormat) -> &'static str {
    match format {
        LogFormat::Text => "text",
        LogFormat::Json => "json",
    }
}

/// What decides which lines are written: the filter (a tracing directive) and the three
/// switches. Pure: [`LogControl`] applies it to the subscriber.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Levels {
    /// The filter given at start (`--log-level`), as it parsed.
    base: String,
    /// The filter in effect.
    directive: String,
    info: bool,
    warning: bool,
    error: bool,
}

impl Levels {
    fn new(level: &str) -> Self {
        let base = if EnvFilter::try_new(level).is_ok() {
            level.to_string()
        } else {
            "info".to_string()
        };
        Levels {
            directive: base.clone(),
            base,
            info: true,
            warning: true,
            error: true,
        }
    }

    fn filter(&self) -> EnvFilter {
        // `directive` is the start filter (checked in `new`) or a plain level.
        EnvFilter::try_new(&self.directive).unwrap_or_else(|_| EnvFilter::new("info"))
    }

    /// The most verbose level the filter lets through (for some target).
    fn max(&self) -> LevelFilter {
        max_of(&self.directive)
    }

    fn settings(&self, format: LogFormat) -> LogSettings {
        let max = self.max();
        LogSettings {
            verbose_level: verbose_of(max),
            info: self.info && max >= LevelFilter::INFO,
            warning: self.warning && max >= LevelFilter::WARN,
            error: self.error && max >= LevelFilter::ERROR,
            format: format_name(format),
            file: "",
        }
    }

    /// These levels with `changes` applied (the verbose level first, then the switches), or why
    /// not.
    fn updated(
        &self,
        changes: &[(String, LogValue)],
        format: LogFormat,
    ) -> Result<Levels, LogSettingsError> {
        let mut verbose = None;
        let mut switches: Vec<(Level, bool)> = Vec::new();
        for (name, value) in changes {
            let wrong = |wanted: &'static str| LogSettingsError::WrongType {
                name: name.clone(),
                wanted,
                got: describe(value),
            };
            match (name.as_str(), value) {
                ("log_verbose_level", LogValue::Uint(v)) => verbose = Some(*v),
                ("log_verbose_level", _) => return Err(wrong("an unsigned integer")),
                ("log_info", LogValue::Bool(on)) => switches.push((Level::INFO, *on)),
                ("log_warning", LogValue::Bool(on)) => switches.push((Level::WARN, *on)),
                ("log_error", LogValue::Bool(on)) => switches.push((Level::ERROR, *on)),
                ("log_info" | "log_warning" | "log_error", _) => {
                    return Err(wrong("a boolean"));
                }
                ("log_format", LogValue::Text(f)) => {
                    if f != format_name(format) {
                        return Err(LogSettingsError::Format {
                            current: format_name(format),
                            asked: f.clone(),
                        });
                    }
                }
                ("log_format", _) => return Err(wrong("a string")),
                ("log_file", LogValue::Text(f)) => {
                    if !f.is_empty() {
                        return Err(LogSettingsError::File(f.clone()));
                    }
                }
                ("log_file", _) => return Err(wrong("a string")),
                (other, _) => return Err(LogSettingsError::Unknown(other.to_string())),
            }
        }
        let mut next = self.clone();
        if let Some(v) = verbose
            && v != verbose_of(next.max())
        {
            next.directive = if verbose_of(max_of(&self.base)) == v {
                self.base.clone()
            } else {
                match v {
                    0 => "info",
                    1 => "debug",
                    _ => "trace",
                }
                .to_string()
            };
        }
        for (level, on) in switches {
            match level {
                Level::INFO => next.info = on,
                Level::WARN => next.warning = on,
                _ => next.error = on,
            }
            if on && next.max() < LevelFilter::from_level(level) {
                next.directive = level.as_str().to_ascii_lowercase();
            }
        }
        Ok(next)
    }
}

fn max_of(directive: &str) -> LevelFilter {
    EnvFilter::try_new(directive)
        .ok()
        .and_then(|f| f.max_level_hint())
        .unwrap_or(LevelFilter::TRACE)
}

/// Triton's verbose level for a filter's most verbose level.
fn verbose_of(max: LevelFilter) -> u32 {
    if max >= LevelFilter::TRACE {
        2
    } else if max >= LevelFilter::DEBUG {
        1
    } else {
        0
    }
}

fn describe(value: &LogValue) -> String {
    match value {
        LogValue::Bool(b) => format!("the boolean {b}"),
        LogValue::Uint(u) => format!("the integer {u}"),
        LogValue::Text(t) => format!("the string {t:?}"),
        LogValue::Missing => "no value".to_string(),
    }
}

/// The three switches, read for every line the filter lets through (so a change takes effect
/// at once, without the callsite cache holding an old answer). Debug and trace lines pass: the
/// filter alone decides those.
#[derive(Clone, Debug)]
struct LevelGate(Arc<[AtomicBool; 3]>);

impl Default for LevelGate {
    fn default() -> Self {
        LevelGate(Arc::new([
            AtomicBool::new(true),
            AtomicBool::new(true),
            AtomicBool::new(true),
        ]))
    }
}

impl LevelGate {
    fn set(&self, levels: &Levels) {
        let [info, warning, error] = &*self.0;
        info.store(levels.info, Ordering::Relaxed);
        warning.store(levels.warning, Ordering::Relaxed);
        error.store(levels.error, Ordering::Relaxed);
    }

    fn allows(&self, level: &Level) -> bool {
        let [info, warning, error] = &*self.0;
        match *level {
            Level::INFO => info.load(Ordering::Relaxed),
            Level::WARN => warning.load(Ordering::Relaxed),
            Level::ERROR => error.load(Ordering::Relaxed),
            _ => true,
        }
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Filter<S> for LevelGate {
    fn enabled(&self, meta: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        self.allows(meta.level())
    }
    // The default `callsite_enabled` ("sometimes") keeps `enabled` asked for every line.
}

/// Log lines dropped because they could not be written, since the process started
/// (`veraltheim_log_lines_dropped_total` on /metrics).
static DROPPED: AtomicU64 = AtomicU64::new(0);

pub fn dropped_lines() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Makes a [`LossyStderr`] per event.
#[derive(Clone, Copy, Debug, Default)]
pub struct LossyStderrWriter;

impl<'a> MakeWriter<'a> for LossyStderrWriter {
    type Writer = LossyStderr;

    fn make_writer(&'a self) -> Self::Writer {
        LossyStderr
    }
}

/// Stderr that drops what it cannot write. The fmt layer writes each event with one
/// `write_all`, so one failed write is one dropped line.
pub struct LossyStderr;

impl Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if io::stderr().write_all(buf).is_err() {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
        // Always "written": an error here would only reach the fallback this type replaces.
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = io::stderr().flush();
        Ok(())
    }
}

/// Writes a message for a person on stderr, if stderr can still take it (`eprintln!` panics
/// when it cannot).
pub fn report(message: std::fmt::Arguments<'_>) {
    let _ = writeln!(io::stderr(), "{message}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(name: &str, value: LogValue) -> (String, LogValue) {
        (name.to_string(), value)
    }

    #[test]
    fn the_settings_answered_are_those_of_the_filter_in_effect() {
        let text = |level: &str| Levels::new(level).settings(LogFormat::Text);
        let s = text("debug");
        assert_eq!(
            (s.verbose_level, s.info, s.warning, s.error),
            (1, true, true, true)
        );
        assert_eq!((s.format, s.file), ("text", ""));
        assert_eq!(text("trace").verbose_level, 2);
        let s = text("info");
        assert_eq!(
            (s.verbose_level, s.info, s.warning, s.error),
            (0, true, true, true)
        );
        let s = text("warn");
        assert_eq!(
            (s.verbose_level, s.info, s.warning, s.error),
            (0, false, true, true)
        );
        let s = text("off");
        assert_eq!(
            (s.verbose_level, s.info, s.warning, s.error),
            (0, false, false, false)
        );
        // Per-target directives: the most verbose one counts.
        assert_eq!(text("warn,veraltheim=debug").verbose_level, 1);
        // A filter that does not parse logs at info, and says so.
        let garbled = Levels::new("veraltheim=loud");
        assert_eq!(garbled.directive, "info");
        assert_eq!(Levels::new("info").settings(LogFormat::Json).format, "json");
    }

    #[test]
    fn the_verbose_level_maps_to_debug_and_trace_and_back_to_the_start_filter() {
        let start = Levels::new("warn,veraltheim=debug");
        let quiet = start
            .updated(
                &[set("log_verbose_level", LogValue::Uint(0))],
                LogFormat::Text,
            )
            .unwrap();
        assert_eq!(quiet.directive, "info");
        assert_eq!(quiet.settings(LogFormat::Text).verbose_level, 0);
        let loud = quiet
            .updated(
                &[set("log_verbose_level", LogValue::Uint(7))],
                LogFormat::Text,
            )
            .unwrap();
        assert_eq!(loud.directive, "trace");
        assert_eq!(loud.settings(LogFormat::Text).verbose_level, 2);
        // The start filter's own level brings it back, per-target directives and all.
        let back = loud
            .updated(
                &[set("log_verbose_level", LogValue::Uint(1))],
                LogFormat::Text,
            )
            .unwrap();
        assert_eq!(back.directive, "warn,veraltheim=debug");
        // Asking for the level in effect changes nothing.
        assert_eq!(
            back.updated(
                &[set("log_verbose_level", LogValue::Uint(1))],
                LogFormat::Text
            ),
            Ok(back.clone())
        );
    }

    #[test]
    fn the_switches_turn_levels_off_and_on() {
        let start = Levels::new("warn");
        let s = start
            .updated(
                &[set("log_warning", LogValue::Bool(false))],
                LogFormat::Text,
            )
            .unwrap();
        assert_eq!(s.directive, "warn", "a switch turned off leaves the filter");
        let answered = s.settings(LogFormat::Text);
        assert_eq!(
            (answered.info, answered.warning, answered.error),
            (false, false, true)
        );
        // Info on under a warn filter: the filter is raised to info for it.
        let s = s
            .updated(&[set("log_info", LogValue::Bool(true))], LogFormat::Text)
            .unwrap();
        assert_eq!(s.directive, "info");
        let answered = s.settings(LogFormat::Text);
        assert_eq!(
            (answered.info, answered.warning, answered.error),
            (true, false, true)
        );
    }

    #[test]
    fn a_bad_update_names_the_setting_and_changes_nothing() {
        let start = Levels::new("info");
        let refused = |changes: &[(String, LogValue)]| {
            start
                .updated(changes, LogFormat::Text)
                .unwrap_err()
                .to_string()
        };
        let e = refused(&[
            set("log_verbose_level", LogValue::Uint(1)),
            set("log_colour", LogValue::Bool(true)),
        ]);
        assert!(e.contains("'log_colour'"), "{e}");
        let e = refused(&[set("log_info", LogValue::Uint(1))]);
        assert!(e.contains("'log_info'") && e.contains("boolean"), "{e}");
        let e = refused(&[set("log_verbose_level", LogValue::Bool(true))]);
        assert!(
            e.contains("'log_verbose_level'") && e.contains("unsigned"),
            "{e}"
        );
        let e = refused(&[set("log_error", LogValue::Missing)]);
        assert!(e.contains("'log_error'") && e.contains("no value"), "{e}");
        let e = refused(&[set("log_format", LogValue::Text("ISO8601".into()))]);
        assert!(e.contains("'text'") && e.contains("ISO8601"), "{e}");
        let e = refused(&[set("log_file", LogValue::Text("/tmp/x.log".into()))]);
        assert!(e.contains("stderr") && e.contains("/tmp/x.log"), "{e}");
        // The format in effect and an empty file are accepted (Triton clients send them).
        let same = start
            .updated(
                &[
                    set("log_format", LogValue::Text("text".into())),
                    set("log_file", LogValue::Text(String::new())),
                ],
                LogFormat::Text,
            )
            .unwrap();
        assert_eq!(same, start);
    }

    /// The subscriber as `init` builds it, writing into a buffer: changes take effect on the
    /// next line, through the reload layer and the gate.
    #[test]
    fn changes_take_effect_on_the_running_log() {
        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl Write for Buffer {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.0.lock().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let (subscriber, control) = build(LogFormat::Json, "info", move || writer.clone());
        let update = |changes: &[(String, LogValue)]| control.update(changes).unwrap();
        tracing::subscriber::with_default(subscriber, || {
            tracing::debug!("d1");
            tracing::info!("i1");
            assert_eq!(
                update(&[set("log_verbose_level", LogValue::Uint(1))]).verbose_level,
                1
            );
            tracing::debug!("d2");
            assert!(!update(&[set("log_info", LogValue::Bool(false))]).info);
            tracing::info!("i2");
            tracing::warn!("w2");
            update(&[
                set("log_verbose_level", LogValue::Uint(0)),
                set("log_info", LogValue::Bool(true)),
            ]);
            tracing::debug!("d3");
            tracing::info!("i3");
        });
        let text = String::from_utf8(buffer.0.lock().clone()).unwrap();
        let messages: Vec<String> = text
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
                v["fields"]["message"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
            .filter(|m| m != "log settings changed")
            .collect();
        assert_eq!(messages, ["i1", "d2", "w2", "i3"], "{text}");
        assert_eq!(control.settings().verbose_level, 0);
    }

    #[test]
    fn a_line_that_cannot_be_written_is_counted_not_raised() {
        // The test harness's stderr works, so count through a writer that fails instead.
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from(io::ErrorKind::BrokenPipe))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let before = dropped_lines();
        if Broken.write_all(b"x").is_err() {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
        assert_eq!(dropped_lines(), before + 1);
        assert_eq!(LossyStderr.write(b"").ok(), Some(0));
    }
}
