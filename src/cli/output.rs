//! Standard output for the subcommands, with pcocc's colours when it is a terminal.
//! Written through one buffered handle so that a table is one write, and so that a closed
//! pipe comes back as an error the caller can stop on instead of a panic.

use std::io::{self, BufWriter, Stdout, Write};

use super::style::{self, Colour, Stream};

/// Buffered stdout that knows whether to colour.
pub struct Output {
    writer: BufWriter<Stdout>,
    colour: bool,
}

impl Output {
    /// The process's stdout, coloured when it is a terminal.
    pub fn stdout() -> Output {
        Output {
            writer: BufWriter::new(io::stdout()),
            colour: style::wants_colour(Stream::Stdout),
        }
    }

    /// Writes `text` as is.
    pub fn text(&mut self, text: &str) -> io::Result<()> {
        self.writer.write_all(text.as_bytes())
    }

    /// Writes `text` and a newline.
    pub fn line(&mut self, text: &str) -> io::Result<()> {
        self.text(text)?;
        self.text("\n")
    }

    /// Writes `text` in `colour` (on a terminal) and a newline.
    pub fn coloured_line(&mut self, text: &str, colour: Colour) -> io::Result<()> {
        let painted = style::paint(text, colour, self.colour);
        self.line(&painted)
    }

    /// Pushes what was written to the terminal or pipe.
    pub fn flush(&mut self) -> io::Result<()> {
        self.writer.flush()
    }
}
