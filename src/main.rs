//! The `slipway` binary: parse arguments, run, map errors to exit codes.
//! Everything else lives in the library (`src/lib.rs`).

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = slipway::cli::Cli::parse();
    // A client's output piped into a reader that stops early (`slipway
    // audit | head -1`) ends it quietly, as any Unix tool: by SIGPIPE,
    // which Rust ignores by default (so println! would panic). Not for the
    // daemons: a peer closing a pipe or a Unix socket (a job's stdin, the
    // Docker Engine) must be an error there, never the end of the node.
    if !matches!(cli.command, slipway::cli::Command::Serve(_) | slipway::cli::Command::Agent { .. }) {
        // SAFETY: called before any other thread exists; SIG_DFL is a
        // valid disposition for SIGPIPE.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    // The agent's stderr is a job's stream on a host: no logging there.
    if !matches!(cli.command, slipway::cli::Command::Agent { .. }) {
        let json = matches!(&cli.command, slipway::cli::Command::Serve(a) if a.log_format == slipway::cli::LogFormat::Json);
        slipway::cli::init_logging(json);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("slipway: cannot start the async runtime: {e}");
            return ExitCode::from(slipway::cli::exit::INTERNAL);
        }
    };
    match runtime.block_on(slipway::cli::run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // Not eprintln!: a closed stderr must not turn the exit code into a panic's.
            let _ = writeln!(std::io::stderr(), "slipway: {}", e.message.trim_end());
            ExitCode::from(e.code)
        }
    }
}
