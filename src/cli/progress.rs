//! A one-line progress bar on stderr for import and export, drawn only when stderr is a
//! terminal (a log file or a pipe gets nothing, so scripts see pcocc's output only):
//!
//! ```text
//! [###########                   ]  37% 1.5 GiB/4.0 GiB
//! ```
//!
//! Plain text redrawn with `\r`, no terminal library: it is one line that only grows in
//! meaning, and the carriage return is understood by every terminal. Redraws are throttled
//! ([`REDRAW_INTERVAL`]) because a conversion reports after every cluster and a terminal
//! cannot show thousands of frames a second anyway; the final state is always drawn.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// The shortest time between two redraws.
pub const REDRAW_INTERVAL: Duration = Duration::from_millis(100);
/// Characters between the brackets.
const BAR_WIDTH: usize = 30;
/// Binary units for the byte counts, each 1024 times the previous.
const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];

/// The state of the bar: where it draws, when it last did, and whether it drew at all.
pub struct Progress {
    sink: Option<Box<dyn Write>>,
    last_draw: Option<Instant>,
    last_line: String,
}

impl Progress {
    /// A bar on stderr if stderr is a terminal, else one that draws nothing.
    pub fn stderr() -> Progress {
        let stderr = std::io::stderr();
        let sink: Option<Box<dyn Write>> = if stderr.is_terminal() {
            Some(Box::new(stderr))
        } else {
            None
        };
        Progress::to(sink)
    }

    /// A bar drawing into `sink` (`None`: drawing nothing).
    pub fn to(sink: Option<Box<dyn Write>>) -> Progress {
        Progress {
            sink,
            last_draw: None,
            last_line: String::new(),
        }
    }

    /// Reports `done` of `total` bytes; redraws if [`REDRAW_INTERVAL`] has passed since
    /// the last redraw, or the work is complete.
    pub fn update(&mut self, done: u64, total: u64) {
        self.update_at(done, total, Instant::now());
    }

    /// [`Progress::update`] at a given time (for tests).
    pub fn update_at(&mut self, done: u64, total: u64, now: Instant) {
        if self.sink.is_none() {
            return;
        }
        let due = self
            .last_draw
            .is_none_or(|last| now.saturating_duration_since(last) >= REDRAW_INTERVAL);
        if !due && done < total {
            return;
        }
        let line = render(done, total);
        if line == self.last_line {
            return;
        }
        self.last_draw = Some(now);
        self.draw(&line);
        self.last_line = line;
    }

    /// Ends the line if anything was drawn, so what follows (an error, the shell prompt)
    /// starts on a line of its own.
    pub fn finish(&mut self) {
        if self.last_line.is_empty() {
            return;
        }
        if let Some(sink) = &mut self.sink {
            // A progress bar that cannot be drawn is not worth failing the transfer.
            let _ = sink.write_all(b"\n").and_then(|()| sink.flush());
        }
        self.last_line.clear();
    }

    fn draw(&mut self, line: &str) {
        if let Some(sink) = &mut self.sink {
            // Pad over a longer previous line (the byte counts may shrink a unit).
            let pad = self.last_line.len().saturating_sub(line.len());
            let text = format!("\r{line}{}", " ".repeat(pad));
            let _ = sink.write_all(text.as_bytes()).and_then(|()| sink.flush());
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The bar for `done` of `total` bytes: `[####      ]  42% 1.2 GiB/2.9 GiB`. A `total`
/// of zero (an empty disk) is complete.
pub fn render(done: u64, total: u64) -> String {
    let done = done.min(total);
    let fraction = if total == 0 {
        1.0
    } else {
        done as f64 / total as f64
    };
    let filled = ((fraction * BAR_WIDTH as f64).floor() as usize).min(BAR_WIDTH);
    let percent = (fraction * 100.0).floor() as u64;
    format!(
        "[{}{}] {percent:>3}% {}/{}",
        "#".repeat(filled),
        " ".repeat(BAR_WIDTH - filled),
        human(done),
        human(total)
    )
}

/// `bytes` in the largest binary unit that keeps the number at least 1, one decimal.
pub fn human(bytes: u64) -> String {
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A sink whose bytes the test can read afterwards.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    const GIB: u64 = 1 << 30;

    #[test]
    fn the_bar_shows_the_fraction_done_and_both_sizes() {
        assert_eq!(
            render(0, 4 * GIB),
            "[                              ]   0% 0 B/4.0 GiB"
        );
        assert_eq!(
            render(3 * GIB / 2, 4 * GIB),
            "[###########                   ]  37% 1.5 GiB/4.0 GiB"
        );
        assert_eq!(
            render(4 * GIB, 4 * GIB),
            "[##############################] 100% 4.0 GiB/4.0 GiB"
        );
    }

    #[test]
    fn an_empty_disk_is_complete_and_overshoot_is_capped() {
        assert!(render(0, 0).contains("100% 0 B/0 B"));
        assert!(render(9, 5).contains("100% 5 B/5 B"));
    }

    #[test]
    fn sizes_use_binary_units_with_one_decimal() {
        assert_eq!(human(0), "0 B");
        assert_eq!(human(1023), "1023 B");
        assert_eq!(human(1024), "1.0 KiB");
        assert_eq!(human(1536 * 1024), "1.5 MiB");
        assert_eq!(human(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn redraws_are_throttled_but_the_end_is_always_drawn() {
        let sink = Captured::default();
        let mut bar = Progress::to(Some(Box::new(sink.clone())));
        let start = Instant::now();
        bar.update_at(1, 100, start);
        bar.update_at(2, 100, start + REDRAW_INTERVAL / 2);
        bar.update_at(3, 100, start + REDRAW_INTERVAL);
        bar.update_at(100, 100, start + REDRAW_INTERVAL + Duration::from_millis(1));
        bar.finish();
        let text = sink.text();
        let frames: Vec<&str> = text.split('\r').filter(|f| !f.is_empty()).collect();
        assert_eq!(frames.len(), 3, "{text:?}");
        assert!(frames[0].contains("  1% 1 B/100 B"), "{text:?}");
        assert!(frames[1].contains("  3% 3 B/100 B"), "{text:?}");
        assert!(frames[2].starts_with("[####"), "{text:?}");
        assert!(text.ends_with("100% 100 B/100 B\n"), "{text:?}");
    }

    #[test]
    fn a_bar_without_a_terminal_draws_nothing() {
        let mut bar = Progress::to(None);
        bar.update(5, 10);
        bar.finish();
        assert!(bar.last_line.is_empty());
    }

    #[test]
    fn a_shorter_line_blanks_what_the_longer_one_left() {
        let sink = Captured::default();
        let mut bar = Progress::to(Some(Box::new(sink.clone())));
        let start = Instant::now();
        bar.update_at(1024, 2048, start);
        bar.update_at(1023, 2048, start + REDRAW_INTERVAL);
        let text = sink.text();
        let frames: Vec<&str> = text.split('\r').filter(|f| !f.is_empty()).collect();
        assert_eq!(frames[0].len(), frames[1].len(), "{text:?}");
    }
}
