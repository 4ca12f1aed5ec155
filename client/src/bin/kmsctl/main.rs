//! `kmsctl`: command-line client for kmsd. Parses arguments, runs one
//! command, and maps its error to a message and an exit status here only.
#![forbid(unsafe_code)]

mod cli;
mod commands;
mod error;
mod input;
mod output;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let json = cli.json;
    match commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = std::io::stderr().write_all(e.render(json).as_bytes());
            ExitCode::from(e.exit_code())
        }
    }
}
