//! The `vpsci` command: parse the command line, then run the VM (exiting with
//! the status [`vpsci::run`] documents) or draw a timeline (0, or 1 with a
//! one-line reason).

use std::process::ExitCode;

use vpsci::cli::{Action, TimelineArgs};

fn main() -> ExitCode {
    match vpsci::cli::parse() {
        Action::Run(config) => {
            let outcome = vpsci::run::run(&config);
            eprintln!("vpsci: {}", outcome.message);
            ExitCode::from(outcome.status)
        }
        Action::Restore(config) => {
            let outcome = vpsci::restore::restore(&config);
            eprintln!("vpsci: {}", outcome.message);
            ExitCode::from(outcome.status)
        }
        Action::Timeline(args) => match draw_timeline(&args) {
            Ok(()) => {
                println!("{}", args.output.display());
                ExitCode::SUCCESS
            }
            Err(message) => {
                eprintln!("vpsci: {message}");
                ExitCode::FAILURE
            }
        },
        Action::Ctl(args) => {
            let stdout = std::io::stdout();
            match vpsci::api::ctl::run(&args, &mut stdout.lock()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(failure) => {
                    eprintln!("vpsci ctl: {}", failure.message);
                    ExitCode::from(failure.status)
                }
            }
        }
        Action::Print(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
    }
}

fn draw_timeline(args: &TimelineArgs) -> Result<(), String> {
    let file =
        std::fs::File::open(&args.events).map_err(|e| format!("{}: {e}", args.events.display()))?;
    let timeline = vpsci::timeline::parse(std::io::BufReader::new(file))
        .map_err(|e| format!("{}: {e}", args.events.display()))?;
    svg::save(&args.output, &vpsci::timeline::render(&timeline))
        .map_err(|e| format!("{}: {e}", args.output.display()))
}
