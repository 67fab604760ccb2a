//! `pcocc`: the `pcocc image …` command line on top of the pcocc-imagefs tree.

use std::process::ExitCode;

fn main() -> ExitCode {
    pcocc_imagefs::cli::run()
}
