//! The text tables of `list`, `show` and `repo list`, laid out as pcocc's (Shine's
//! `TextTable`) so that output parsed by scripts stays the same: every column is
//! left-aligned and as wide as its widest cell or header, columns are separated by four
//! spaces, trailing spaces are cut, and the header is underlined by replacing each
//! non-space character with `-` (`CREATION DATE` over `-------- ----`).

/// Spaces between two columns, as pcocc prints them.
const COLUMN_GAP: &str = "    ";

/// A table of text cells with upper-cased headers.
#[derive(Debug, Clone)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column names (upper-cased when printed, like pcocc).
    pub fn new(headers: &[&str]) -> Table {
        Table {
            headers: headers.iter().map(|h| h.to_uppercase()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds one row; missing cells print empty, extra cells are ignored.
    pub fn push(&mut self, row: Vec<String>) {
        self.rows.push(row);
    }

    /// The whole table, one `\n`-terminated line per row after the header and underline.
    pub fn render(&self) -> String {
        let widths: Vec<usize> = (0..self.headers.len())
            .map(|column| {
                self.rows
                    .iter()
                    .filter_map(|row| row.get(column))
                    .chain(std::iter::once(&self.headers[column]))
                    .map(|cell| cell.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let underline: Vec<String> = self
            .headers
            .iter()
            .map(|h| {
                h.chars()
                    .map(|c| if c == ' ' { ' ' } else { '-' })
                    .collect()
            })
            .collect();
        let mut out = String::new();
        for row in [&self.headers, &underline].into_iter().chain(&self.rows) {
            let mut line = String::new();
            for (column, width) in widths.iter().enumerate() {
                if column > 0 {
                    line.push_str(COLUMN_GAP);
                }
                let cell = row.get(column).map_or("", String::as_str);
                line.push_str(cell);
                let pad = width.saturating_sub(cell.chars().count());
                line.extend(std::iter::repeat_n(' ', pad));
            }
            out.push_str(line.trim_end_matches(' '));
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cells(values: &[&str]) -> Vec<String> {
        values.iter().map(|v| v.to_string()).collect()
    }

    #[test]
    fn columns_are_padded_to_the_widest_cell_and_lines_are_right_stripped() {
        let mut table = Table::new(&["name", "path", "writable"]);
        table.push(cells(&["user", "/r/user", "True"]));
        table.push(cells(&["global", "/r/global", "True"]));
        assert_eq!(
            table.render(),
            "NAME      PATH         WRITABLE\n\
             ----      ----         --------\n\
             user      /r/user      True\n\
             global    /r/global    True\n"
        );
    }

    #[test]
    fn underline_keeps_the_spaces_of_a_header() {
        let mut table = Table::new(&["revision", "size", "creation date"]);
        table.push(cells(&["0", "1.0 MB", "2026-11-27 03:16:22"]));
        assert_eq!(
            table.render(),
            "REVISION    SIZE      CREATION DATE\n\
             --------    ----      -------- ----\n\
             0           1.0 MB    2026-11-27 03:16:22\n"
        );
    }

    #[test]
    fn an_empty_table_prints_its_header_only() {
        let table = Table::new(&["name", "path", "writable"]);
        assert_eq!(
            table.render(),
            "NAME    PATH    WRITABLE\n----    ----    --------\n"
        );
    }

    #[test]
    fn an_empty_last_cell_leaves_no_trailing_spaces() {
        let mut table = Table::new(&["a", "b"]);
        table.push(cells(&["x", ""]));
        table.push(cells(&["y"]));
        assert_eq!(table.render(), "A    B\n-    -\nx\ny\n");
    }

    #[test]
    fn width_counts_characters_not_bytes() {
        let mut table = Table::new(&["owner", "x"]);
        table.push(cells(&["éric", "1"]));
        assert_eq!(table.render(), "OWNER    X\n-----    -\néric     1\n");
    }
}
