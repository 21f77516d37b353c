//! The `veraltheim` binary: everything is in the library ([`veraltheim::run`]).

use std::process::ExitCode;

// mimalloc rather than glibc's malloc: a request's buffers are allocated on one thread and freed
// on another (tokio worker → execution pool → tokio worker), which glibc serves through arena
// locks and chunk consolidation (13% of the server's CPU under load, measured with perf). The
// load generator uses the same allocator, so that its echo baseline is not handicapped.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    veraltheim::run()
}
