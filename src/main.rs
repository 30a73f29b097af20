//! The `wxgate` binary: clap reads the command line, then the library runs the command (see
//! `wxgate::Cli`): serve (the default), check-config, reload, or demo (with the `demo`
//! feature, on by default; see the `wxgate-demo` crate).

use std::process::ExitCode;

/// jemalloc, not the system allocator: a request allocates a few dozen short-lived blocks
/// while the code cache keeps millions of small long-lived ones, and glibc's malloc spends a
/// tenth of a request's CPU on that mix (README, Performance).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    match wxgate::Cli::parse_args(std::env::args_os()) {
        Ok(cli) => cli.run(),
        // Help and version on stdout, exit 0; a usage error on stderr, exit 64.
        Err(error) => wxgate::usage_error(&error),
    }
}
