//! fabricctl: the operators' command line for a Fabric cluster (see `fabric_controller::cli`).

use std::process::ExitCode;

use clap::Parser;
use fabric_controller::cli::{self, Cli};

fn main() -> ExitCode {
    let args = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("fabricctl: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fabricctl: {}", cli::error_line(&e));
            ExitCode::FAILURE
        }
    }
}
