//! The command line of `pcocc`, as clap structures. The help texts live in [`super::help`]
//! and usage errors are reworded click-style in [`super::usage`], so that `pcocc image …`
//! reads and fails like pcocc's; here is only the shape of the arguments.

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, ColorChoice, Parser, Subcommand};

use super::help;

/// `pcocc [--config FILE] [-v] COMMAND`.
#[derive(Debug, Parser)]
#[command(
    name = "pcocc",
    bin_name = "pcocc",
    version,
    override_usage = "pcocc [OPTIONS] COMMAND [ARGS]...",
    help_template = help::PCOCC,
    subcommand_required = true,
    arg_required_else_help = true,
    disable_help_subcommand = true,
    disable_version_flag = true,
    color = ColorChoice::Never
)]
pub struct Args {
    /// A repos.yaml that replaces the user and system ones.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log level: warnings by default, info with `-v`, debug with `-vv`.
    #[arg(short, long, action = ArgAction::Count)]
    pub verbose: u8,
    /// `--version` prints `pcocc VERSION` and exits, as click's version option does: a
    /// long option only (clap's default `-V` is left out, pcocc has no short form).
    #[arg(long, action = ArgAction::Version)]
    version: Option<bool>,
    #[command(subcommand)]
    pub command: Command,
}

/// The top-level commands (pcocc has many; this project implements `image`).
#[derive(Debug, Subcommand)]
pub enum Command {
    #[command(
        override_usage = "pcocc image [OPTIONS] COMMAND [ARGS]...",
        help_template = help::IMAGE,
        subcommand_required = true,
        arg_required_else_help = true,
        disable_help_subcommand = true
    )]
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
}

/// `pcocc image COMMAND`.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    #[command(
        override_usage = "pcocc image list [OPTIONS] [REGEX]",
        help_template = help::LIST
    )]
    List {
        /// Only this repository: the last one given, as pcocc (its option may be repeated),
        /// and an empty name means every repository.
        #[arg(
            short = 'R',
            long = "repo",
            value_name = "TEXT",
            overrides_with = "repo"
        )]
        repo: Option<String>,
        /// Only names where this regular expression matches (anywhere).
        #[arg(value_name = "REGEX")]
        regex: Option<String>,
    },
    #[command(
        override_usage = "pcocc image show [OPTIONS] IMAGE",
        help_template = help::SHOW
    )]
    Show {
        #[arg(value_name = "IMAGE")]
        image: String,
    },
    #[command(
        override_usage = "pcocc image copy [OPTIONS] SOURCE DEST",
        help_template = help::COPY
    )]
    Copy {
        #[arg(value_name = "SOURCE")]
        source: String,
        #[arg(value_name = "DEST")]
        dest: String,
    },
    #[command(
        override_usage = "pcocc image delete [OPTIONS] IMAGE",
        help_template = help::DELETE
    )]
    Delete {
        #[arg(value_name = "IMAGE")]
        image: String,
    },
    #[command(
        override_usage = "pcocc image resize [OPTIONS] IMAGE NEW_SZ",
        help_template = help::RESIZE
    )]
    Resize {
        #[arg(value_name = "IMAGE")]
        image: String,
        /// The new virtual size, in qemu-img's syntax (`20G`).
        #[arg(value_name = "NEW_SZ")]
        size: String,
    },
    #[command(
        override_usage = IMPORT_USAGE,
        help_template = help::IMPORT
    )]
    Import(Transfer),
    #[command(
        override_usage = EXPORT_USAGE,
        help_template = help::EXPORT
    )]
    Export(Transfer),
    #[command(
        override_usage = "pcocc image repo [OPTIONS] COMMAND [ARGS]...",
        help_template = help::REPO,
        subcommand_required = true,
        arg_required_else_help = true,
        disable_help_subcommand = true
    )]
    Repo {
        #[command(subcommand)]
        command: RepoCommand,
    },
}

/// The usage lines of import and export (also used by their late usage errors).
pub const IMPORT_USAGE: &str = "pcocc image import [OPTIONS] [KIND] SOURCE DEST";
pub const EXPORT_USAGE: &str = "pcocc image export [OPTIONS] [KIND] SOURCE DEST";

/// The arguments of import and export: `[-t FMT] [KIND] SOURCE DEST`. clap cannot have an
/// optional positional before required ones, so the operands are two required ones and a
/// hidden third: with three, the first is the old KIND (see
/// [`super::transfer::operands`]). A missing one is then named SOURCE or DEST, as pcocc
/// names it.
#[derive(Debug, clap::Args)]
pub struct Transfer {
    /// The format of the file (import: the source; export: the destination).
    #[arg(short = 't', long = "fmt", value_name = "TEXT")]
    pub fmt: Option<String>,
    #[arg(value_name = "SOURCE")]
    pub first: String,
    #[arg(value_name = "DEST")]
    pub second: String,
    #[arg(value_name = "DEST", hide = true)]
    pub third: Option<String>,
}

/// `pcocc image repo COMMAND`.
#[derive(Debug, Subcommand)]
pub enum RepoCommand {
    #[command(
        override_usage = "pcocc image repo list [OPTIONS]",
        help_template = help::REPO_LIST
    )]
    List,
    #[command(
        override_usage = "pcocc image repo gc [OPTIONS] REPO",
        help_template = help::REPO_GC
    )]
    Gc {
        /// Keep unused layers and scratch files younger than this (default one hour).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        grace: Option<Duration>,
        #[arg(value_name = "REPO")]
        repo: String,
    },
}

/// Seconds in each unit `--grace` accepts after its number.
const DURATION_UNITS: [(&str, u64); 5] = [("", 1), ("s", 1), ("m", 60), ("h", 3600), ("d", 86400)];

/// Parses `--grace`: a whole number of seconds, or a number followed by `s`, `m`, `h` or
/// `d` (`90m`, `2h`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let scale = DURATION_UNITS
        .iter()
        .find(|(name, _)| *name == unit)
        .map(|(_, seconds)| *seconds)
        .ok_or_else(|| format!("'{text}' is not a duration (examples: 0, 600, 90m, 2h, 1d)"))?;
    let count: u64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a duration (examples: 0, 600, 90m, 2h, 1d)"))?;
    count
        .checked_mul(scale)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("'{text}' is too long a duration"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_clap_definition_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn verbose_counts_and_config_takes_a_path() {
        let args = Args::try_parse_from([
            "pcocc", "--config", "/r.yaml", "-vv", "image", "repo", "list",
        ])
        .expect("valid command line");
        assert_eq!(args.verbose, 2);
        assert_eq!(args.config, Some(PathBuf::from("/r.yaml")));
        assert!(matches!(
            args.command,
            Command::Image {
                command: ImageCommand::Repo {
                    command: RepoCommand::List
                }
            }
        ));
    }

    #[test]
    fn grace_durations_take_an_optional_unit() {
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("600"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("90m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86400)));
        for bad in ["", "h", "1x", "-1", "1.5h", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    fn transfer(args: &[&str]) -> Transfer {
        let argv = ["pcocc", "image"].into_iter().chain(args.iter().copied());
        match Args::try_parse_from(argv)
            .expect("valid command line")
            .command
        {
            Command::Image {
                command: ImageCommand::Import(t) | ImageCommand::Export(t),
            } => t,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn import_and_export_take_a_format_and_two_or_three_operands() {
        let t = transfer(&["import", "-t", "qcow2", "disk", "img"]);
        assert_eq!(t.fmt.as_deref(), Some("qcow2"));
        assert_eq!(
            (t.first.as_str(), t.second.as_str(), t.third),
            ("disk", "img", None)
        );
        let t = transfer(&["export", "vm", "img", "--fmt=raw", "out"]);
        assert_eq!(t.fmt.as_deref(), Some("raw"));
        assert_eq!(t.third.as_deref(), Some("out"));
        let four = ["pcocc", "image", "import", "vm", "a", "b", "c"];
        assert!(Args::try_parse_from(four).is_err());
    }

    #[test]
    fn list_takes_a_repository_and_a_regex() {
        let args = Args::try_parse_from(["pcocc", "image", "list", "-R", "user", "^img"])
            .expect("valid command line");
        let Command::Image {
            command: ImageCommand::List { repo, regex },
        } = args.command
        else {
            panic!("parsed as another command");
        };
        assert_eq!(repo.as_deref(), Some("user"));
        assert_eq!(regex.as_deref(), Some("^img"));
    }
}
