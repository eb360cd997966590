//! The `cybernetic` binary: parse the command line, set up logging, load the configuration,
//! dispatch.

use clap::Parser;

use cybernetic::cli::{Cli, run};
use cybernetic::config::Config;
use cybernetic::telemetry;

/// mimalloc: request handling allocates many small, short-lived buffers, which glibc's malloc
/// handles markedly slower (measured in docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let config = match Config::load() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::from(2);
        }
    };
    telemetry::init_tracing(config.log_format);
    match run(cli.command, config).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
