//! The log's writer: lines go to stderr, and a line that cannot be written (the reader of a
//! pipe went away, the disk under a redirected log is full) is dropped and counted, never
//! retried, reported on stderr or turned into a panic. Logging must not take the server down
//! (issue 18, case 1): the stock writer's fallback reports a failed write with `eprintln!`,
//! which panics when stderr itself fails, and a panic while logging aborted the process.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};

use tracing_subscriber::fmt::MakeWriter;

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
