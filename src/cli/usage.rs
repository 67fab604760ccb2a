//! Command-line mistakes, told the way pcocc (click) tells them, because users and scripts
//! know those lines:
//!
//! ```text
//! Usage: pcocc image show [OPTIONS] IMAGE
//! Try 'pcocc image show --help' for help.
//!
//! Error: Missing argument 'IMAGE'.
//! ```
//!
//! clap finds the mistake; this module only rewords it. Usage errors exit with 2, help asked
//! for is printed on stdout with 0, and a group called without a command prints its help on
//! stderr with 2, as click does.

use clap::error::{ContextKind, ContextValue, ErrorKind};

/// Exit status of a usage error (click's).
pub const USAGE_EXIT: u8 = 2;

/// What to print for a command line clap did not accept, where, and the exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub text: String,
    pub to_stdout: bool,
    pub exit: u8,
}

/// Rewords a clap error as click would print it.
pub fn explain(error: &clap::Error) -> Rejection {
    match error.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => Rejection {
            text: error.to_string(),
            to_stdout: true,
            exit: 0,
        },
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => Rejection {
            text: error.to_string(),
            to_stdout: false,
            exit: USAGE_EXIT,
        },
        _ => Rejection {
            text: usage_error(error),
            to_stdout: false,
            exit: USAGE_EXIT,
        },
    }
}

fn usage_error(error: &clap::Error) -> String {
    let usage = context_text(error, ContextKind::Usage);
    usage_text(usage.as_deref(), &message(error))
}

/// A usage error found after clap accepted the command line: `usage` is the command's
/// usage (`pcocc image import [OPTIONS] …`), `message` the `Error:` sentence.
pub fn rejection(usage: &str, message: &str) -> Rejection {
    Rejection {
        text: usage_text(Some(&format!("Usage: {usage}")), message),
        to_stdout: false,
        exit: USAGE_EXIT,
    }
}

/// click's layout: the usage line, where to find help, a blank line, the error.
fn usage_text(usage: Option<&str>, message: &str) -> String {
    let mut text = String::new();
    if let Some(usage) = usage {
        let usage = usage.trim_end();
        text.push_str(usage);
        text.push('\n');
        let command = usage
            .trim_start_matches("Usage:")
            .split(" [OPTIONS]")
            .next()
            .unwrap_or("")
            .trim();
        text.push_str(&format!("Try '{command} --help' for help.\n\n"));
    }
    text.push_str("Error: ");
    text.push_str(message);
    text.push('\n');
    text
}

/// The `Error:` sentence, in click's words.
fn message(error: &clap::Error) -> String {
    let invalid_arg = context_text(error, ContextKind::InvalidArg).unwrap_or_default();
    match error.kind() {
        ErrorKind::InvalidSubcommand => {
            let name = context_text(error, ContextKind::InvalidSubcommand).unwrap_or_default();
            match suggestions(error, ContextKind::SuggestedSubcommand).first() {
                Some(s) => format!("No such command '{name}'. Did you mean '{s}'?"),
                None => format!("No such command '{name}'."),
            }
        }
        ErrorKind::UnknownArgument if looks_like_option(&invalid_arg) => {
            let option = invalid_arg.split('=').next().unwrap_or_default();
            let suggested = suggestions(error, ContextKind::SuggestedArg);
            match suggested.as_slice() {
                [] => format!("No such option '{option}'."),
                [one] => format!("No such option '{option}'. Did you mean '{one}'?"),
                many => format!(
                    "No such option '{option}'. (Did you mean one of: {}?)",
                    many.iter()
                        .map(|s| format!("'{s}'"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        }
        ErrorKind::UnknownArgument => format!("Got unexpected extra argument ({invalid_arg})"),
        ErrorKind::MissingRequiredArgument => {
            let name = invalid_arg.trim_start_matches('<').trim_end_matches('>');
            format!("Missing argument '{name}'.")
        }
        ErrorKind::InvalidValue | ErrorKind::NoEquals
            if context_text(error, ContextKind::InvalidValue).is_some_and(|v| v.is_empty()) =>
        {
            let option = invalid_arg.split([' ', '=']).next().unwrap_or_default();
            format!("Option '{option}' requires an argument.")
        }
        ErrorKind::ValueValidation => {
            let option = invalid_arg.split([' ', '=']).next().unwrap_or_default();
            match std::error::Error::source(error) {
                Some(reason) => format!("Invalid value for '{option}': {reason}"),
                None => clap_sentence(error),
            }
        }
        _ => clap_sentence(error),
    }
}

/// clap's own wording, first line only and without its `error: ` prefix, for the mistakes
/// click has no sentence of its own for.
fn clap_sentence(error: &clap::Error) -> String {
    let rendered = error.to_string();
    let first = rendered.lines().next().unwrap_or("invalid command line");
    let sentence = first.strip_prefix("error: ").unwrap_or(first);
    let mut chars = sentence.chars();
    match chars.next() {
        Some(c) => c.to_uppercase().chain(chars).collect(),
        None => sentence.to_string(),
    }
}

fn looks_like_option(arg: &str) -> bool {
    arg.starts_with('-') && arg != "-"
}

/// One context value as text: a lone string, or the first of several.
fn context_text(error: &clap::Error, kind: ContextKind) -> Option<String> {
    match error.get(kind)? {
        ContextValue::String(s) => Some(s.clone()),
        ContextValue::Strings(list) => list.first().cloned(),
        ContextValue::StyledStr(s) => Some(s.to_string()),
        ContextValue::StyledStrs(list) => list.first().map(ToString::to_string),
        _ => None,
    }
}

fn suggestions(error: &clap::Error, kind: ContextKind) -> Vec<String> {
    match error.get(kind) {
        Some(ContextValue::String(s)) => vec![s.clone()],
        Some(ContextValue::Strings(list)) => list.clone(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::args::Args;
    use clap::Parser;

    fn rejection(args: &[&str]) -> Rejection {
        let argv = std::iter::once("pcocc").chain(args.iter().copied());
        let error = Args::try_parse_from(argv).expect_err("the command line should be refused");
        explain(&error)
    }

    #[test]
    fn a_late_usage_error_has_the_same_layout() {
        assert_eq!(
            rejection_after_parse(),
            Rejection {
                text: "Usage: pcocc image import [OPTIONS] [KIND] SOURCE DEST\n\
                       Try 'pcocc image import --help' for help.\n\
                       \n\
                       Error: Bad kind.\n"
                    .to_string(),
                to_stdout: false,
                exit: 2,
            }
        );
    }

    fn rejection_after_parse() -> Rejection {
        super::rejection(
            "pcocc image import [OPTIONS] [KIND] SOURCE DEST",
            "Bad kind.",
        )
    }

    #[test]
    fn a_missing_argument_is_told_with_the_subcommands_usage() {
        assert_eq!(
            rejection(&["image", "repo", "gc"]),
            Rejection {
                text: "Usage: pcocc image repo gc [OPTIONS] REPO\n\
                       Try 'pcocc image repo gc --help' for help.\n\
                       \n\
                       Error: Missing argument 'REPO'.\n"
                    .to_string(),
                to_stdout: false,
                exit: 2,
            }
        );
    }

    #[test]
    fn the_first_missing_argument_is_named() {
        assert!(
            rejection(&["image", "copy"])
                .text
                .ends_with("Error: Missing argument 'SOURCE'.\n")
        );
        assert!(
            rejection(&["image", "copy", "a"])
                .text
                .ends_with("Error: Missing argument 'DEST'.\n")
        );
    }

    #[test]
    fn an_unknown_command_is_named() {
        assert_eq!(
            rejection(&["image", "frobnicate"]).text,
            "Usage: pcocc image [OPTIONS] COMMAND [ARGS]...\n\
             Try 'pcocc image --help' for help.\n\
             \n\
             Error: No such command 'frobnicate'.\n"
        );
    }

    #[test]
    fn a_near_miss_command_gets_a_suggestion() {
        assert!(
            rejection(&["imag", "list"])
                .text
                .ends_with("Error: No such command 'imag'. Did you mean 'image'?\n")
        );
    }

    #[test]
    fn unknown_options_and_extra_arguments_are_told_apart() {
        let option = rejection(&["image", "list", "--foo"]).text;
        assert!(
            option.starts_with("Usage: pcocc image list [OPTIONS] [REGEX]\n"),
            "{option}"
        );
        assert!(
            option.ends_with("Error: No such option '--foo'.\n"),
            "{option}"
        );
        let extra = rejection(&["image", "show", "a", "b"]).text;
        assert!(
            extra.ends_with("Error: Got unexpected extra argument (b)\n"),
            "{extra}"
        );
    }

    #[test]
    fn an_option_without_its_value_is_named() {
        let text = rejection(&["image", "list", "-R"]).text;
        assert!(
            text.ends_with("Error: Option '--repo' requires an argument.\n"),
            "{text}"
        );
    }

    #[test]
    fn an_invalid_value_is_named_with_the_reason() {
        let text = rejection(&["image", "repo", "gc", "--grace", "1x", "user"]).text;
        assert!(
            text.ends_with(
                "Error: Invalid value for '--grace': '1x' is not a duration (examples: 0, 600, 90m, 2h, 1d)\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn help_goes_to_stdout_and_succeeds() {
        let help = rejection(&["image", "show", "--help", "extra"]);
        assert!(help.to_stdout);
        assert_eq!(help.exit, 0);
        assert_eq!(help.text, crate::cli::help::SHOW);
    }

    #[test]
    fn a_group_without_a_command_prints_its_help_as_an_error() {
        let help = rejection(&["image"]);
        assert!(!help.to_stdout);
        assert_eq!(help.exit, 2);
        assert_eq!(help.text, crate::cli::help::IMAGE);
    }
}
