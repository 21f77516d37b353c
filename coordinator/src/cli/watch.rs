//! `veraltheim jobs watch ID`: follows the `WatchJob` stream (the job now, then each change of
//! state, reason, attempt or progress) until the job ends.
//!
//! - On a terminal: each change is printed as a line, and below it one live progress line,
//!   redrawn in place with `\r` ten times a second: a spinner, the state, a bar (filled by the
//!   job's progress when it reports one, a bouncing marker otherwise), the percentage and the
//!   time in the current state. Hand-rolled rather than `indicatif`: one line with `\r` and an
//!   erase-line escape is all this needs; `indicatif` 0.18 would bring four crates new to the
//!   build (`console`, `encode_unicode`, `unit-prefix`, `web-time`) for it, hides itself when
//!   the output is not a terminal (so the plain path below would stay), and rate-limits its own
//!   drawing, which makes the exact output harder to test. Here the line is a pure function
//!   ([`bar_line`]) with unit tests.
//! - Otherwise (a pipe, a file, `--json`): one plain line per change (`STATE attempt N [P%]
//!   REASON`), or one JSON object per change with `--json`; nothing is redrawn.
//!
//! The exit status is 0 when the job SUCCEEDED and 1 otherwise (FAILED, CANCELLED, TIMED_OUT,
//! or a stream that ended before the job did).

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::bail;
use futures::{Stream, StreamExt};
use veraltheim_proto::v1;

/// How the changes are shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Lines, and a live progress line redrawn in place (a terminal).
    Bar,
    /// One line per change.
    Plain,
    /// One JSON object per change.
    Json,
}

/// Cells of the bar.
const BAR_CELLS: usize = 24;
/// How often the live line is redrawn.
pub const TICK: Duration = Duration::from_millis(100);

fn state_name(s: i32) -> String {
    super::job_state_name(s)
}

pub(super) fn is_terminal(state: i32) -> bool {
    matches!(
        v1::JobState::try_from(state),
        Ok(v1::JobState::Succeeded
            | v1::JobState::Failed
            | v1::JobState::Cancelled
            | v1::JobState::TimedOut)
    )
}

/// The job's progress as a fraction, when it reports one (a finished job is complete).
fn progress(job: &v1::Job) -> Option<f64> {
    if job.state == v1::JobState::Succeeded as i32 {
        return Some(1.0);
    }
    (job.progress > 0.0 && job.progress.is_finite()).then(|| job.progress.min(1.0))
}

/// `RUNNING attempt 1 42%  running`: one change, for logs and pipes.
pub fn plain_line(job: &v1::Job) -> String {
    let pct = match progress(job) {
        Some(p) if !is_terminal(job.state) => format!(" {:.0}%", p * 100.0),
        _ => String::new(),
    };
    format!(
        "{} attempt {}{pct}  {}",
        state_name(job.state),
        job.attempt,
        job.reason
    )
}

fn clock(ms: u64) -> String {
    let s = ms / 1000;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{:02}:{:02}", s / 60, s % 60)
    }
}

/// The live line: spinner, state, bar, percentage, time in this state since `since_ms`, the
/// reason; cut to `width` characters.
pub fn bar_line(job: &v1::Job, now_ms: u64, since_ms: u64, tick: u64, width: usize) -> String {
    let spinner = ['|', '/', '-', '\\'][(tick % 4) as usize];
    let (bar, pct) = match progress(job) {
        Some(p) => {
            let filled = ((p * BAR_CELLS as f64).round() as usize).min(BAR_CELLS);
            (
                format!("{}{}", "#".repeat(filled), "-".repeat(BAR_CELLS - filled)),
                format!("{:>3.0}%", p * 100.0),
            )
        }
        None => {
            // A three-cell marker bouncing from one end to the other: work, amount unknown.
            let span = (BAR_CELLS - 3) as u64;
            let pos = (tick % (2 * span)) as usize;
            let pos = if pos > span as usize {
                2 * span as usize - pos
            } else {
                pos
            };
            (
                format!("{}<=>{}", " ".repeat(pos), " ".repeat(BAR_CELLS - 3 - pos)),
                "    ".to_string(),
            )
        }
    };
    let line = format!(
        "{spinner} {:<10} attempt {} [{bar}] {pct} {}  {}",
        state_name(job.state),
        job.attempt,
        clock(now_ms.saturating_sub(since_ms)),
        job.reason
    );
    line.chars().take(width.max(20)).collect()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The terminal's width for the live line: `COLUMNS`, else 80; one column is kept free so that
/// the line never wraps (a wrapped line cannot be redrawn with `\r`).
pub fn terminal_width() -> usize {
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.trim().parse::<usize>().ok())
        .filter(|c| *c > 0)
        .unwrap_or(80)
        .saturating_sub(1)
}

/// When the job entered the state it is in, by its own timestamps (the server's clock).
fn state_since(job: &v1::Job) -> u64 {
    match v1::JobState::try_from(job.state) {
        Ok(v1::JobState::Running) if job.started_ms > 0 => job.started_ms,
        _ if job.finished_ms > 0 => job.finished_ms,
        _ => job.created_ms,
    }
}

/// Shows `stream` in `mode` on `out` until the job ends; returns its last state. A stream that
/// ends before the job does, or fails, is an error.
pub async fn watch<S>(mut stream: S, mode: Mode, out: &mut dyn Write) -> anyhow::Result<i32>
where
    S: Stream<Item = Result<v1::Job, tonic::Status>> + Unpin,
{
    const ERASE: &str = "\r\x1b[2K";
    let width = terminal_width();
    let mut last: Option<v1::Job> = None;
    let mut tick = 0u64;
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let next = if mode == Mode::Bar {
            tokio::select! {
                next = stream.next() => next,
                _ = ticker.tick() => {
                    if let Some(job) = &last {
                        tick += 1;
                        let line = bar_line(job, now_ms(), state_since(job), tick, width);
                        write!(out, "{ERASE}{line}")?;
                        out.flush()?;
                    }
                    continue;
                }
            }
        } else {
            stream.next().await
        };
        let job = match next {
            Some(Ok(job)) => job,
            Some(Err(status)) => {
                if mode == Mode::Bar && last.is_some() {
                    writeln!(out, "{ERASE}")?;
                }
                return Err(super::status_error(status));
            }
            None => {
                if mode == Mode::Bar && last.is_some() {
                    write!(out, "{ERASE}")?;
                }
                let state = last.map_or("unknown".into(), |j| state_name(j.state));
                bail!("the watch ended before the job did (last state {state})");
            }
        };
        match mode {
            Mode::Json => writeln!(out, "{}", super::job_json(&job))?,
            Mode::Plain => writeln!(out, "{}", plain_line(&job))?,
            Mode::Bar => {
                writeln!(out, "{ERASE}{}", plain_line(&job))?;
                if !is_terminal(job.state) {
                    let line = bar_line(&job, now_ms(), state_since(&job), tick, width);
                    write!(out, "{line}")?;
                }
            }
        }
        out.flush()?;
        if is_terminal(job.state) {
            return Ok(job.state);
        }
        last = Some(job);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(state: v1::JobState, attempt: u32, progress: f64, reason: &str) -> v1::Job {
        v1::Job {
            id: "00017000000000000000".into(),
            state: state as i32,
            attempt,
            progress,
            reason: reason.into(),
            created_ms: 1_000,
            started_ms: if attempt > 0 { 2_000 } else { 0 },
            ..Default::default()
        }
    }

    #[test]
    fn plain_lines_name_state_attempt_progress_and_reason() {
        use v1::JobState::*;
        assert_eq!(
            plain_line(&job(Queued, 0, 0.0, "submitted")),
            "QUEUED attempt 0  submitted"
        );
        assert_eq!(
            plain_line(&job(Running, 1, 0.42, "running")),
            "RUNNING attempt 1 42%  running"
        );
        assert_eq!(
            plain_line(&job(Succeeded, 1, 1.0, "exited with code 0")),
            "SUCCEEDED attempt 1  exited with code 0"
        );
    }

    #[test]
    fn the_bar_fills_with_progress_and_bounces_without_it() {
        use v1::JobState::*;
        let half = bar_line(&job(Running, 1, 0.5, "running"), 65_000, 2_000, 0, 200);
        assert_eq!(
            half,
            "| RUNNING    attempt 1 [############------------]  50% 01:03  running"
        );
        let a = bar_line(&job(Running, 1, 0.0, "r"), 2_000, 2_000, 0, 200);
        let b = bar_line(&job(Running, 1, 0.0, "r"), 2_000, 2_000, 5, 200);
        assert!(a.contains("[<=>                     ]"), "{a}");
        assert!(b.contains("[     <=>                ]"), "{b}");
        assert_ne!(a.chars().next(), b.chars().next(), "the spinner turns");
        // It bounces back rather than running off the end.
        for tick in 0..200 {
            let l = bar_line(&job(Queued, 0, 0.0, ""), 0, 0, tick, 200);
            assert_eq!(l.matches("<=>").count(), 1, "{l}");
            let (open, close) = (l.find('[').unwrap(), l.find(']').unwrap());
            assert_eq!(close - open - 1, BAR_CELLS, "{l}");
        }
        let hours = bar_line(&job(Running, 1, 0.0, "r"), 2_000 + 3_723_000, 2_000, 0, 200);
        assert!(hours.contains(" 1:02:03 "), "{hours}");
        let narrow = bar_line(&job(Running, 1, 0.0, "a long reason"), 0, 0, 0, 30);
        assert_eq!(narrow.chars().count(), 30);
    }

    fn stream_of(
        jobs: Vec<Result<v1::Job, tonic::Status>>,
    ) -> impl Stream<Item = Result<v1::Job, tonic::Status>> + Unpin {
        futures::stream::iter(jobs)
    }

    #[tokio::test]
    async fn plain_and_json_modes_print_one_line_per_change_and_end_on_a_terminal_state() {
        use v1::JobState::*;
        let changes = vec![
            Ok(job(Queued, 0, 0.0, "submitted")),
            Ok(job(Running, 1, 0.0, "running")),
            Ok(job(Failed, 1, 0.0, "exited with code 3")),
            // Never read: the job already ended.
            Ok(job(Queued, 9, 0.0, "ignored")),
        ];
        let mut out = Vec::new();
        let last = watch(stream_of(changes.clone()), Mode::Plain, &mut out)
            .await
            .unwrap();
        assert_eq!(last, Failed as i32);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "QUEUED attempt 0  submitted\nRUNNING attempt 1  running\nFAILED attempt 1  exited with code 3\n"
        );
        let mut out = Vec::new();
        watch(stream_of(changes), Mode::Json, &mut out)
            .await
            .unwrap();
        let lines: Vec<serde_json::Value> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[2]["state"], "FAILED");
    }

    #[tokio::test]
    async fn a_stream_that_ends_early_or_fails_is_an_error() {
        use v1::JobState::*;
        let mut out = Vec::new();
        let err = watch(
            stream_of(vec![Ok(job(Running, 1, 0.0, "running"))]),
            Mode::Plain,
            &mut out,
        )
        .await
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "the watch ended before the job did (last state RUNNING)"
        );
        let err = watch(
            stream_of(vec![Err(tonic::Status::not_found("no job with id 'x'"))]),
            Mode::Plain,
            &mut out,
        )
        .await
        .unwrap_err();
        assert!(format!("{err:#}").contains("no job with id 'x'"), "{err:#}");
    }

    #[tokio::test]
    async fn bar_mode_redraws_one_line_and_leaves_the_changes_above_it() {
        use v1::JobState::*;
        let mut out = Vec::new();
        let changes = vec![
            Ok(job(Running, 1, 0.25, "running")),
            Ok(job(Succeeded, 1, 1.0, "exited with code 0")),
        ];
        let last = watch(stream_of(changes), Mode::Bar, &mut out)
            .await
            .unwrap();
        assert_eq!(last, Succeeded as i32);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("\r\x1b[2KRUNNING attempt 1 25%  running\n"),
            "{text:?}"
        );
        assert!(text.contains("[######------------------]  25%"), "{text:?}");
        assert!(
            text.ends_with("\r\x1b[2KSUCCEEDED attempt 1  exited with code 0\n"),
            "{text:?}"
        );
    }
}
