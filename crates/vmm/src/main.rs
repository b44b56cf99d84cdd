//! The `vpsci` command: parse the command line, run the VM, exit with the
//! status [`vpsci::run`] documents.

use std::process::ExitCode;

fn main() -> ExitCode {
    let config = vpsci::cli::parse();
    let outcome = vpsci::run::run(&config);
    eprintln!("vpsci: {}", outcome.message);
    ExitCode::from(outcome.status)
}
