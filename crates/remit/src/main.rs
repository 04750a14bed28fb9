//! The `remit` binary: parse the command line, build the settings, run one command. Glue only;
//! the work happens in the library crates.

mod cli;
mod commands;
mod config;
mod demo;
mod server;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(code) => code,
        Err(error) => {
            commands::print_error(&error);
            ExitCode::FAILURE
        }
    }
}
