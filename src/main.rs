//! The `slipway` binary: parse arguments, run, map errors to exit codes.
//! Everything else lives in the library (`src/lib.rs`).

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = slipway::cli::Cli::parse();
    // A client's output piped into a reader that stops early (`slipway
    // audit | head -1`) ends it quietly, as any Unix tool: by SIGPIPE. Not
    // by setting SIGPIPE back to its default, though: a TLS handshake or a
    // request written to a socket the server has closed would then kill
    // the CLI with no word (issue 18, https to a plain server). SIGPIPE
    // stays ignored, as Rust sets it, so sockets get EPIPE as an error,
    // and a print to a closed stdout or stderr (which panics in println!)
    // ends the process by SIGPIPE here. The daemons (`serve`, the agent)
    // keep the default panic report: a closed pipe there is an error.
    if !matches!(cli.command, slipway::cli::Command::Serve(_) | slipway::cli::Command::Agent { .. }) {
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = info.payload().downcast_ref::<String>().map(String::as_str).or_else(|| info.payload().downcast_ref::<&str>().copied());
            if message.is_some_and(|m| m.starts_with("failed printing to std") && m.contains("Broken pipe")) {
                // SAFETY: restoring the default disposition and raising
                // the signal this process would have died of.
                unsafe {
                    libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                    libc::raise(libc::SIGPIPE);
                }
            }
            report(info);
        }));
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
