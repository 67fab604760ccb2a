//! `pcocc image list | show | copy | delete | resize`: each parses its URIs, makes one call on the
//! tree, and prints pcocc's output for the result.

use regex::Regex;

use super::format::{format_size, format_timestamp};
use super::style::Colour;
use super::table::Table;
use super::{CliError, Context};
use crate::tree::{RevisionInfo, Uri};

/// What `copy` prints first, before anything can fail (pcocc's text).
pub const COPY_START: &str = "Copying image ...";
/// What `copy` prints on success: pcocc's text, misspelling included, because scripts
/// written for pcocc match it.
const COPY_DONE: &str = "Image successufly copied";
/// Width of the rules and rows of `show`'s header block.
const SHOW_WIDTH: usize = 30;
/// Width a label of `show`'s header block is padded to; the value is right-aligned in
/// the rest of [`SHOW_WIDTH`] (pcocc's layout, measured on its output).
const SHOW_LABEL_WIDTH: usize = 6;
/// `show`'s owner label, with the two spaces pcocc always puts before the owner.
const OWNER_LABEL: &str = "Owner:  ";
/// Shown in `show`'s SIZE column when a revision's top layer file is missing.
const MISSING_LAYER: &str = "missing";

/// `pcocc image list [-R REPO] [REGEX]`: per repository in priority order, a heading and
/// a table of the images whose name `REGEX` matches anywhere (Python's `re.search`).
pub fn list(ctx: &mut Context, repo: Option<&str>, regex: Option<&str>) -> Result<(), CliError> {
    let filter = regex
        .map(|text| Regex::new(&from_python(text)).map_err(|e| CliError::Regex(regex_reason(&e))))
        .transpose()?;
    let repos: Vec<String> = match repo {
        Some(name) => vec![name.to_string()],
        None => ctx
            .tree
            .repo_names()
            .into_iter()
            .map(str::to_string)
            .collect(),
    };
    for repo in &repos {
        let images = ctx.tree.list_images(&ctx.caller, repo)?;
        let mut table = Table::new(&["name", "type", "revision", "repo", "owner", "date"]);
        let mut shown = 0;
        for image in images {
            let meta = &image.latest;
            if filter.as_ref().is_some_and(|f| !f.is_match(&meta.name)) {
                continue;
            }
            shown += 1;
            table.push(vec![
                meta.name.clone(),
                meta.kind.clone(),
                meta.revision.to_string(),
                image.repo.clone(),
                meta.owner.clone(),
                format_timestamp(meta.timestamp),
            ]);
        }
        if shown == 0 {
            continue;
        }
        ctx.out
            .coloured_line(&format!("{} images:", capitalize(repo)), Colour::BoldBlue)?;
        ctx.out.text(&table.render())?;
        ctx.out.line("")?;
    }
    Ok(())
}

/// Python's `str.capitalize`, which pcocc applies to repository names in headings: the
/// first character upper case, the others lower case (`myRepo` becomes `Myrepo`).
fn capitalize(name: &str) -> String {
    let mut chars = name.chars();
    match chars.next() {
        Some(first) => first
            .to_uppercase()
            .chain(chars.flat_map(char::to_lowercase))
            .collect(),
        None => String::new(),
    }
}

/// Indentation of the pattern and caret lines in the regex crate's diagnostics.
const REGEX_DIAGNOSTIC_INDENT: usize = 4;

/// The regex crate's multi-line diagnostic folded into one line like Python's: its last
/// line is the reason (`error: unclosed group`), and for a one-line pattern the caret
/// under it gives the position (`unclosed group at position 0`).
/// A pattern in Python's `re` syntax (pcocc's) written for the `regex` crate, where the
/// two differ and Python's meaning can be kept: `\Z` (end of text) is `\z`; a bound
/// left out of a repetition (`{,2}`, `{3,}`) is written out, and a `{` that starts no
/// repetition is a plain brace; inside a set, `[` is a plain bracket (Python has no
/// nested sets nor POSIX classes: `[[:alpha:]]` is a set followed by `]`), and so are
/// `&` and `~` (the crate's set operators `&&` and `~~`) and the second `-` of `--` (a
/// range ending at `-`); an inline comment `(?#...)` goes. Look-around and
/// back-references stay unsupported (the crate refuses them).
fn from_python(pattern: &str) -> String {
    let chars: Vec<char> = pattern.chars().collect();
    let mut out = String::with_capacity(pattern.len() + 8);
    let mut i = 0;
    let mut in_set = false;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\\' => {
                match chars.get(i + 1) {
                    Some('Z') if !in_set => out.push_str("\\z"),
                    Some(&next) => {
                        out.push('\\');
                        out.push(next);
                    }
                    None => out.push('\\'),
                }
                i += 2;
                continue;
            }
            '[' if !in_set => {
                in_set = true;
                out.push('[');
                // `^` and a `]` right after the opening are part of the set.
                if chars.get(i + 1) == Some(&'^') {
                    out.push('^');
                    i += 1;
                }
                if chars.get(i + 1) == Some(&']') {
                    out.push_str("\\]");
                    i += 1;
                }
            }
            ']' if in_set => {
                in_set = false;
                out.push(']');
            }
            '[' | '&' | '~' if in_set => {
                out.push('\\');
                out.push(c);
            }
            // `--` in a set: a range ending at `-` (`[+--]`), not the crate's set
            // difference.
            '-' if in_set && chars.get(i + 1) == Some(&'-') => {
                out.push_str("-\\-");
                i += 2;
                continue;
            }
            // An inline comment.
            '(' if !in_set && chars.get(i + 1) == Some(&'?') && chars.get(i + 2) == Some(&'#') => {
                match chars[i..].iter().position(|&c| c == ')') {
                    Some(len) => {
                        i += len + 1;
                        continue;
                    }
                    None => out.push(c),
                }
            }
            '{' if !in_set => match repetition(&chars[i..]) {
                Some((text, len)) => {
                    out.push_str(&text);
                    i += len;
                    continue;
                }
                None => out.push_str("\\{"),
            },
            _ => out.push(c),
        }
        i += 1;
    }
    out
}

/// The repetition `{m}`, `{m,}`, `{,n}`, `{m,n}` or `{,}` that `chars` starts with, as
/// the `regex` crate writes it, and its length; `None` for a `{` that starts none
/// (Python then reads it as a plain brace).
fn repetition(chars: &[char]) -> Option<(String, usize)> {
    let end = chars.iter().position(|&c| c == '}')?;
    let inner: String = chars[1..end].iter().collect();
    let digits = |s: &str| s.chars().all(|c| c.is_ascii_digit());
    let text = match inner.split_once(',') {
        None if !inner.is_empty() && digits(&inner) => format!("{{{inner}}}"),
        Some((m, n)) if digits(m) && digits(n) => {
            let m = if m.is_empty() { "0" } else { m };
            format!("{{{m},{n}}}")
        }
        _ => return None,
    };
    Some((text, end + 1))
}

fn regex_reason(error: &regex::Error) -> String {
    let text = error.to_string();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let reason = lines
        .last()
        .map_or("", |l| l.trim().trim_start_matches("error: "));
    // A one-line pattern gives exactly: heading, pattern, caret line, reason.
    match lines.as_slice() {
        [_, _, caret, _] if caret.trim().starts_with('^') => {
            let column = caret.find('^').unwrap_or(0);
            let position = column.saturating_sub(REGEX_DIAGNOSTIC_INDENT);
            format!("{reason} at position {position}")
        }
        _ => reason.to_string(),
    }
}

/// `pcocc image show IMAGE`: a header block about the given (or latest) revision, then
/// every revision of the image in revision order (pcocc printed directory order).
pub fn show(ctx: &mut Context, image: &str) -> Result<(), CliError> {
    let uri = Uri::parse(image)?;
    let found = ctx.tree.resolve(&ctx.caller, &uri)?;
    let mut revisions = ctx
        .tree
        .revisions(&ctx.caller, &found.repo, &found.meta.name)?;
    revisions.sort_by_key(|r| r.meta.revision);
    let meta = &found.meta;
    let blocks = [
        vec![
            ("Repo:", found.repo.clone()),
            ("Name:", meta.name.clone()),
            ("Type:", meta.kind.clone()),
        ],
        vec![
            (
                "URI:",
                format!("{}:{}@{}", found.repo, meta.name, meta.revision),
            ),
            ("Layers:", meta.data_blobs.len().to_string()),
        ],
        vec![
            // pcocc's owner field is 22 wide after two spaces: a long name keeps them.
            (OWNER_LABEL, meta.owner.clone()),
            ("Date:", format_timestamp(meta.timestamp)),
        ],
    ];
    let rule = "-".repeat(SHOW_WIDTH);
    let mut text = format!("{rule}\n");
    for block in &blocks {
        for (label, value) in block {
            text.push_str(&header_row(label, value));
        }
        text.push_str(&rule);
        text.push('\n');
    }
    text.push('\n');
    text.push_str(&revision_table(&revisions).render());
    ctx.out.text(&text)?;
    Ok(())
}

/// One `Label:      value` row of `show`'s header: the label padded to
/// [`SHOW_LABEL_WIDTH`], the value right-aligned to [`SHOW_WIDTH`] (and simply following
/// the label when it is longer).
fn header_row(label: &str, value: &str) -> String {
    let label_width = SHOW_LABEL_WIDTH.max(label.chars().count());
    let value_width = SHOW_WIDTH.saturating_sub(label_width);
    format!("{label:<label_width$}{value:>value_width$}\n")
}

fn revision_table(revisions: &[RevisionInfo]) -> Table {
    let mut table = Table::new(&["revision", "size", "creation date"]);
    for revision in revisions {
        table.push(vec![
            revision.meta.revision.to_string(),
            revision
                .top_layer_size
                .map_or_else(|| MISSING_LAYER.to_string(), format_size),
            format_timestamp(revision.meta.timestamp),
        ]);
    }
    table
}

/// `pcocc image copy SOURCE DEST`: `DEST@0` lists the same layers as `SOURCE`.
pub fn copy(ctx: &mut Context, source: &str, dest: &str) -> Result<(), CliError> {
    let source = Uri::parse(source)?;
    let dest = Uri::parse(dest)?;
    let outcome = ctx.tree.copy(&ctx.caller, &source, &dest)?;
    if let Some(other) = &outcome.shadowed_in {
        let warning = format!(
            "Warning: an image with name {} already exists in another repo ({other})",
            outcome.name
        );
        ctx.out.coloured_line(&warning, Colour::Magenta)?;
    }
    log::info!(
        "copied {source} to {}:{}@0 ({} layers already there, {} linked, {} copied)",
        outcome.repo,
        outcome.name,
        outcome.layers_present,
        outcome.layers_linked,
        outcome.layers_copied
    );
    ctx.out.coloured_line(COPY_DONE, Colour::Green)?;
    Ok(())
}

/// `pcocc image delete IMAGE`: one revision, or all of them; prints nothing.
pub fn delete(ctx: &mut Context, image: &str) -> Result<(), CliError> {
    let uri = Uri::parse(image)?;
    let deleted = ctx.tree.delete(&ctx.caller, &uri)?;
    log::info!(
        "deleted {}:{} revisions {:?}",
        deleted.repo,
        deleted.name,
        deleted.revisions
    );
    Ok(())
}

/// `pcocc image resize IMAGE NEW_SZ`: the next revision of IMAGE with NEW_SZ as its
/// virtual size; prints nothing. The image is looked up before the size is judged, so a
/// missing image is reported first, as pcocc does.
pub fn resize(ctx: &mut Context, image: &str, size: &str) -> Result<(), CliError> {
    let uri = Uri::parse(image)?;
    let size = match super::size::parse_size(size) {
        Ok(size) => size,
        Err(e) => {
            ctx.tree.resolve(&ctx.caller, &uri)?;
            return Err(e.into());
        }
    };
    let meta = ctx.tree.resize(&ctx.caller, &uri, size)?;
    log::info!(
        "resized {image} to {size} bytes: {}@{} has {} layers",
        meta.name,
        meta.revision,
        meta.data_blobs.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headings_capitalize_like_python() {
        assert_eq!(capitalize("user"), "User");
        assert_eq!(capitalize("myRepo"), "Myrepo");
        assert_eq!(capitalize(""), "");
    }

    #[test]
    fn header_rows_are_thirty_wide_unless_the_value_is_longer() {
        assert_eq!(
            header_row("Repo:", "user"),
            "Repo:                     user\n"
        );
        assert_eq!(
            header_row("Layers:", "3"),
            "Layers:                      3\n"
        );
        assert_eq!(
            header_row("Date:", "2026-11-27 03:16:22"),
            "Date:      2026-11-27 03:16:22\n"
        );
        assert_eq!(
            header_row("URI:", "myRepo:averyveryverylongimagename@0"),
            "URI:  myRepo:averyveryverylongimagename@0\n"
        );
        assert_eq!(
            header_row(OWNER_LABEL, "root"),
            "Owner:                    root\n"
        );
        assert_eq!(
            header_row(OWNER_LABEL, "abcdefghijklmnopqrstuvw"),
            "Owner:  abcdefghijklmnopqrstuvw\n"
        );
    }

    /// `list REGEX` reads Python's syntax (pcocc's), as far as the crate can: the same
    /// names match as with `re.search`.
    #[test]
    fn list_patterns_mean_what_they_mean_to_python() {
        let matches = |pattern: &str, name: &str| {
            Regex::new(&from_python(pattern))
                .unwrap_or_else(|e| panic!("{pattern}: {e}"))
                .is_match(name)
        };
        assert!(matches(r"a\Z", "data"));
        assert!(!matches(r"a\Z", "dat"));
        assert!(matches("^a{,2}b$", "aab") && !matches("^a{,2}b$", "aaab"));
        assert!(matches("^a{2,}$", "aaa") && !matches("^a{2,}$", "a"));
        assert!(matches("^a{2}$", "aa") && matches("^a{1,2}$", "a"));
        assert!(matches("^x{,}$", "xxxx"));
        // A brace that starts no repetition is a brace.
        assert!(matches("a{b", "a{b") && matches("a{}", "a{}") && matches("{x}", "{x}"));
        // No POSIX class: a set of `[:alph` followed by `]`.
        assert!(!matches("[[:alpha:]]", "img1"));
        assert!(matches("[[:alpha:]]", "a]"));
        assert!(matches("[a&&b]", "&") && matches("[a~~b]", "~"));
        assert!(matches("[]x]", "]") && matches("[^]x]", "y") && !matches("^[^]x]$", "]"));
        assert!(matches(r"\d+[.-]\w", "v1.x") && matches(r"[\]]", "]"));
        // `[+--]` is the range from `+` to `-` (`,` among them); `[_--]` is refused, as
        // Python refuses it (a range out of order).
        assert!(matches("[+--]", "a-b") && matches("^[+--]$", ",") && !matches("[+--]", "ab"));
        assert!(Regex::new(&from_python("[_--]")).is_err());
        assert!(matches("(?#a comment)^img", "img1") && !matches("^(?#x)b", "img"));
    }

    #[test]
    fn a_regex_error_becomes_one_line() {
        // Built at run time: clippy rightly refuses a literal invalid regex.
        let unbalanced = String::from("(");
        let error = Regex::new(&unbalanced).expect_err("unbalanced");
        assert_eq!(regex_reason(&error), "unclosed group at position 0");
        let late = String::from("ab[");
        let error = Regex::new(&late).expect_err("unclosed class");
        assert_eq!(
            regex_reason(&error),
            "unclosed character class at position 2"
        );
    }
}
