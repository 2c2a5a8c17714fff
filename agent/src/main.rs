//! `amm-agent`: see the library crate for what it does.

use clap::Parser;

fn main() -> std::process::ExitCode {
    match amm_agent::cli::Cli::parse().run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("amm-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
