//! Colours, only when the stream is a terminal, as pcocc (click) prints them: errors red,
//! repository headings blue and bold, success green, warnings magenta. `NO_COLOR` (see
//! no-color.org) turns them off even on a terminal.

use std::io::IsTerminal;

/// The output streams a message can go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// The colours pcocc uses, with click's ANSI codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Colour {
    /// Errors.
    Red,
    /// Success messages.
    Green,
    /// Repository headings in `list` (always bold).
    BoldBlue,
    /// Warnings.
    Magenta,
}

impl Colour {
    /// The escape sequence that starts this colour (click writes bold after the colour).
    fn start(self) -> &'static str {
        match self {
            Colour::Red => "\x1b[31m",
            Colour::Green => "\x1b[32m",
            Colour::BoldBlue => "\x1b[34m\x1b[1m",
            Colour::Magenta => "\x1b[35m",
        }
    }
}

/// The sequence that ends any colour.
const RESET: &str = "\x1b[0m";

/// Whether text written to `stream` should be coloured.
pub fn wants_colour(stream: Stream) -> bool {
    if std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty()) {
        return false;
    }
    match stream {
        Stream::Stdout => std::io::stdout().is_terminal(),
        Stream::Stderr => std::io::stderr().is_terminal(),
    }
}

/// `text` in `colour` when `enabled`, unchanged otherwise.
pub fn paint(text: &str, colour: Colour, enabled: bool) -> String {
    if enabled {
        format!("{}{text}{RESET}", colour.start())
    } else {
        text.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn painted_text_uses_clicks_escape_sequences() {
        assert_eq!(
            paint("User images:", Colour::BoldBlue, true),
            "\x1b[34m\x1b[1mUser images:\x1b[0m"
        );
        assert_eq!(paint("oops", Colour::Red, true), "\x1b[31moops\x1b[0m");
    }

    #[test]
    fn text_stays_plain_when_colour_is_off() {
        assert_eq!(paint("oops", Colour::Red, false), "oops");
    }
}
