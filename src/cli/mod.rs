//! The `pcocc image …` command line: parses arguments, calls the [`crate::tree`] for each
//! subcommand and prints what pcocc prints, byte for byte where scripts may read it.
//!
//! Shaped like fd's `main`: [`run`] parses, runs one subcommand that returns a `Result`,
//! and prints an error once, in one place, with pcocc's exit codes (0 success, 255 a
//! failed command, 2 a usage error). Files: [`args`] (clap structures), [`help`] (help
//! texts), [`usage`] (usage errors the click way), [`table`], [`format`](mod@format) (sizes,
//! dates), [`style`] (colours on a terminal), [`output`] (stdout with colours), then one
//! file per subcommand group: [`image`], [`transfer`] (import, export; with [`guess`]
//! for file formats and [`progress`] for the bar) and [`repo`].

pub mod args;
pub mod format;
pub mod guess;
pub mod help;
pub mod image;
pub mod output;
pub mod progress;
pub mod repo;
pub mod size;
pub mod style;
pub mod table;
pub mod transfer;
pub mod usage;

use std::collections::HashSet;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Mutex;

use clap::Parser;

use crate::config::Config;
use crate::tree::{Caller, Tree};
use args::{Args, Command, ImageCommand, RepoCommand};
use output::Output;
use style::{Colour, Stream};

/// Exit status of a command that failed (pcocc's `sys.exit(-1)`).
const FAILURE_EXIT: u8 = 255;

/// Why a subcommand failed; the message is what the user sees.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Uri(#[from] crate::tree::UriError),
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    #[error(transparent)]
    Tree(#[from] crate::tree::Error),
    /// pcocc's wording, space before the colon included.
    #[error("Could not parse regular expression :{0}")]
    Regex(String),
    /// Writing to stdout failed for another reason than a closed pipe.
    #[error("cannot write to standard output: {0}")]
    Output(std::io::Error),
    /// The file of an import or export has no format we can use.
    #[error(transparent)]
    Guess(#[from] guess::GuessError),
    /// An import source that is not a regular file (pcocc's wording, space included).
    #[error("Failed to import {0} : not an image file")]
    NotAnImage(String),
    /// An export of an image of another kind (`ctr`) to a VM format (pcocc's message).
    #[error("{format} is not a valid {kind} format")]
    KindFormat { format: &'static str, kind: String },
    /// An export of an image of another kind with no format: pcocc hands container
    /// images to skopeo, which this project does not do.
    #[error("{name} is a {kind} image: container images are not handled here, only VM images")]
    NotAVmImage { name: String, kind: String },
    /// A command line clap accepted but that makes no sense (an old `KIND` other than
    /// `vm`): told like clap's usage errors, exit 2. `usage` is the command's usage line.
    #[error("{message}")]
    Usage {
        usage: &'static str,
        message: String,
    },
    /// `resize` was given a size that no disk can have (pcocc's start, qemu's reason).
    #[error("Unable to create image. {0}")]
    Size(#[from] size::SizeError),
    /// Stdout was closed by its reader (`pcocc image list | head -1`): stop quietly.
    #[error("standard output was closed")]
    ClosedOutput,
}

impl From<std::io::Error> for CliError {
    fn from(error: std::io::Error) -> CliError {
        if error.kind() == std::io::ErrorKind::BrokenPipe {
            CliError::ClosedOutput
        } else {
            CliError::Output(error)
        }
    }
}

/// What every subcommand works with: the repositories, who runs the command, and stdout.
pub struct Context {
    pub tree: Tree,
    pub caller: Caller,
    pub out: Output,
}

/// Runs `pcocc` with the process's arguments and returns its exit status.
pub fn run() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(error) => return reject(&error),
    };
    init_logging(args.verbose);
    match execute(&args) {
        Ok(()) | Err(CliError::ClosedOutput) => ExitCode::SUCCESS,
        Err(CliError::Usage { usage, message }) => reject_with(usage::rejection(usage, &message)),
        Err(error) => {
            let coloured = style::wants_colour(Stream::Stderr);
            let text = style::paint(&error.to_string(), Colour::Red, coloured);
            // Nothing sensible is left to do if stderr is gone too.
            let _ = writeln!(std::io::stderr(), "{text}");
            ExitCode::from(FAILURE_EXIT)
        }
    }
}

fn reject(error: &clap::Error) -> ExitCode {
    reject_with(usage::explain(error))
}

fn reject_with(rejection: usage::Rejection) -> ExitCode {
    // A closed stream cannot be told about anything; the exit status still tells.
    let _ = if rejection.to_stdout {
        std::io::stdout().write_all(rejection.text.as_bytes())
    } else {
        std::io::stderr().write_all(rejection.text.as_bytes())
    };
    ExitCode::from(rejection.exit)
}

/// Runs the subcommand `args` names.
fn execute(args: &Args) -> Result<(), CliError> {
    let Command::Image { command } = &args.command;
    // Copy says what it does before anything can fail, as pcocc does.
    if let ImageCommand::Copy { .. } = command {
        let mut out = Output::stdout();
        out.line(image::COPY_START)?;
        out.flush()?;
    }
    // Operands are checked before any repository is touched, as clap's own checks are.
    if let ImageCommand::Import(t) | ImageCommand::Export(t) = command {
        let usage = match command {
            ImageCommand::Import(_) => args::IMPORT_USAGE,
            _ => args::EXPORT_USAGE,
        };
        transfer::operands(&t.first, &t.second, t.third.as_deref(), usage)?;
    }
    let config = Config::load(args.config.as_deref())?;
    let mut context = Context {
        tree: Tree::new(&config)?,
        caller: Caller::current(),
        out: Output::stdout(),
    };
    let result = match command {
        ImageCommand::List { repo, regex } => {
            // pcocc tests the option's truth: `-R ''` lists every repository.
            let repo = repo.as_deref().filter(|r| !r.is_empty());
            image::list(&mut context, repo, regex.as_deref())
        }
        ImageCommand::Show { image } => image::show(&mut context, image),
        ImageCommand::Copy { source, dest } => image::copy(&mut context, source, dest),
        ImageCommand::Delete { image } => image::delete(&mut context, image),
        ImageCommand::Resize { image, size } => image::resize(&mut context, image, size),
        ImageCommand::Import(t) => {
            let (source, dest) =
                transfer::operands(&t.first, &t.second, t.third.as_deref(), args::IMPORT_USAGE)?;
            transfer::import(&mut context, t.fmt.as_deref(), &source, &dest)
        }
        ImageCommand::Export(t) => {
            let (source, dest) =
                transfer::operands(&t.first, &t.second, t.third.as_deref(), args::EXPORT_USAGE)?;
            transfer::export(&mut context, t.fmt.as_deref(), &source, &dest)
        }
        ImageCommand::Repo { command } => match command {
            RepoCommand::List => repo::list(&mut context),
            RepoCommand::Gc { repo, grace } => repo::gc(&mut context, repo, *grace),
        },
    };
    context.out.flush()?;
    result
}

/// Logs go to stderr as Python's logging prints them for pcocc (`WARNING:root:…`), so
/// messages pcocc users know read the same. Warnings show by default, `-v` adds info and
/// `-vv` debug; `RUST_LOG` overrides both. A warning is printed once per run: one command
/// may read a repository several times, and a bad metadata file is one problem.
fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        _ => log::LevelFilter::Debug,
    };
    let seen = Mutex::new(SeenWarnings::default());
    let mut builder = env_logger::Builder::new();
    builder
        .filter_level(level)
        .parse_env("RUST_LOG")
        .format(move |buf, record| {
            let message = record.args().to_string();
            if record.level() <= log::Level::Warn
                && !seen.lock().map_or(true, |mut s| s.first_time(&message))
            {
                return Ok(());
            }
            let level = match record.level() {
                log::Level::Error => "ERROR",
                log::Level::Warn => "WARNING",
                log::Level::Info => "INFO",
                log::Level::Debug | log::Level::Trace => "DEBUG",
            };
            writeln!(buf, "{level}:root:{message}")
        });
    // Only fails if a logger is already set, which cannot happen in the binary.
    let _ = builder.try_init();
}

/// How many distinct warnings are remembered for de-duplication; past that, repeats print
/// again rather than memory growing without bound.
const MAX_REMEMBERED_WARNINGS: usize = 10_000;

/// The warnings already printed in this run.
#[derive(Default)]
struct SeenWarnings(HashSet<String>);

impl SeenWarnings {
    /// True the first time `message` is seen (and always once the memory is full).
    fn first_time(&mut self, message: &str) -> bool {
        if self.0.contains(message) {
            return false;
        }
        if self.0.len() < MAX_REMEMBERED_WARNINGS {
            self.0.insert(message.to_string());
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_warning_is_shown_once_per_run() {
        let mut seen = SeenWarnings::default();
        assert!(seen.first_time("bad meta"));
        assert!(!seen.first_time("bad meta"));
        assert!(seen.first_time("other"));
    }
}
