//! Image URIs, `[REPO:]IMAGE[@REVISION]`, as every `pcocc image` subcommand takes them: the
//! one parser of the project (the CLI calls [`Uri::parse`]; the mount has no URIs).
//!
//! pcocc splits on the last `@`, hands the rest to Python's `int()` and keeps only the first
//! two `:`-separated parts, so `x@-1`, `x@+1` and `x@1_0` parse and `user:a:b` silently means
//! `user:a`. We accept exactly the documented form and reject the rest with a message that
//! says what is wrong, so a typo never acts on another image than the one meant. An empty
//! repository (`:IMAGE`) is the default repository, as in pcocc. The name is checked here
//! too ([`super::validate_name`]'s rule), so a bad destination fails before any work.

/// The one separator between repository and image name.
const REPO_SEPARATOR: char = ':';
/// The one separator between image name and revision.
const REVISION_SEPARATOR: char = '@';
/// How the URI syntax is written in pcocc's help and man page.
const URI_SYNTAX: &str = "[REPO:]IMAGE[@REVISION]";

/// A parsed `[REPO:]IMAGE[@REVISION]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uri {
    /// `None`: no `REPO:` was given (lookups search every repository in priority order).
    /// `Some("")`: an empty repository (`:IMAGE`), which pcocc reads as the default one.
    pub repo: Option<String>,
    /// The image name; [`Uri::parse`] only returns valid ones.
    pub name: String,
    /// `None` means the latest revision (for lookups) or all revisions (for delete).
    pub revision: Option<u64>,
}

/// Why a URI was refused. The messages of the cases pcocc also refuses are pcocc's own.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    /// Not a revision number at all, as pcocc says it.
    #[error("Bad revision: {0}")]
    BadRevision(String),
    /// Nothing after `@`.
    #[error(
        "Bad revision: nothing after '@' in {0} (write {1}@N, or leave out '@' for the latest revision)"
    )]
    EmptyRevision(String, String),
    /// Something Python's `int()` takes but that is not a plain revision number.
    #[error("Bad revision: {0} (a revision is a plain number: 0, 1, 2, ...)")]
    NotPlainRevision(String),
    /// More digits than any revision can have.
    #[error("Bad revision: {0} is too large")]
    RevisionTooLarge(String),
    /// `a:b:c`, `a@1@2` and the like.
    #[error("Bad image URI {uri}: more than one '{separator}' (expected {URI_SYNTAX})")]
    ExtraSeparator { uri: String, separator: char },
    /// `repo:` or `@1`.
    #[error("Empty object name")]
    EmptyName,
    /// A name pcocc could never have written.
    #[error("Object name contains invalid characters")]
    InvalidName,
}

impl Uri {
    /// Parses `text` strictly (see the module comment for what pcocc accepted and we do
    /// not). `repo: Some("")` is the default repository; `name` matches
    /// `[a-zA-Z0-9_.-]+`.
    pub fn parse(text: &str) -> Result<Uri, UriError> {
        let extra = |separator| UriError::ExtraSeparator {
            uri: text.to_string(),
            separator,
        };
        let (location, revision) = match text.split_once(REVISION_SEPARATOR) {
            None => (text, None),
            Some((_, rest)) if rest.contains(REVISION_SEPARATOR) => {
                return Err(extra(REVISION_SEPARATOR));
            }
            Some((location, rest)) => (location, Some(parse_revision(text, location, rest)?)),
        };
        let (repo, name) = match location.split_once(REPO_SEPARATOR) {
            None => (None, location),
            Some((_, name)) if name.contains(REPO_SEPARATOR) => {
                return Err(extra(REPO_SEPARATOR));
            }
            Some((repo, name)) => (Some(repo.to_string()), name),
        };
        match super::validate_name(name) {
            Ok(()) => {}
            Err(super::Error::EmptyName) => return Err(UriError::EmptyName),
            Err(_) => return Err(UriError::InvalidName),
        }
        Ok(Uri {
            repo,
            name: name.to_string(),
            revision,
        })
    }
}

fn parse_revision(uri: &str, location: &str, text: &str) -> Result<u64, UriError> {
    if text.is_empty() {
        return Err(UriError::EmptyRevision(
            uri.to_string(),
            location.to_string(),
        ));
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse()
            .map_err(|_| UriError::RevisionTooLarge(text.to_string()));
    }
    // What Python's int() also accepts: surrounding spaces, a sign, digit underscores.
    let python_int = text.trim().trim_start_matches(['+', '-']).replace('_', "");
    if !python_int.is_empty() && python_int.bytes().all(|b| b.is_ascii_digit()) {
        return Err(UriError::NotPlainRevision(text.to_string()));
    }
    Err(UriError::BadRevision(text.to_string()))
}

impl std::fmt::Display for Uri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(r) = &self.repo {
            write!(f, "{r}:")?;
        }
        f.write_str(&self.name)?;
        if let Some(n) = self.revision {
            write!(f, "@{n}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(repo: Option<&str>, name: &str, revision: Option<u64>) -> Uri {
        Uri {
            repo: repo.map(str::to_string),
            name: name.to_string(),
            revision,
        }
    }

    fn message(text: &str) -> String {
        Uri::parse(text)
            .expect_err("the URI should be refused")
            .to_string()
    }

    #[test]
    fn every_documented_form_parses() {
        assert_eq!(Uri::parse("img").unwrap(), uri(None, "img", None));
        assert_eq!(Uri::parse("img@3").unwrap(), uri(None, "img", Some(3)));
        assert_eq!(
            Uri::parse("user:img").unwrap(),
            uri(Some("user"), "img", None)
        );
        assert_eq!(
            Uri::parse("global:My-img_1.0@12").unwrap(),
            uri(Some("global"), "My-img_1.0", Some(12))
        );
    }

    #[test]
    fn an_empty_repository_means_the_default_one_as_in_pcocc() {
        assert_eq!(Uri::parse(":img").unwrap(), uri(Some(""), "img", None));
        assert_eq!(Uri::parse(":img@2").unwrap(), uri(Some(""), "img", Some(2)));
        assert_eq!(message(":"), "Empty object name");
    }

    #[test]
    fn a_uri_prints_back_as_it_was_written() {
        for text in ["img", "r:img@3", ":img", "img@0"] {
            assert_eq!(Uri::parse(text).unwrap().to_string(), text);
        }
    }

    #[test]
    fn leading_zeros_are_still_the_same_revision() {
        assert_eq!(Uri::parse("img@007").unwrap().revision, Some(7));
    }

    #[test]
    fn a_word_after_at_is_a_bad_revision_as_pcocc_says() {
        assert_eq!(message("img1@x"), "Bad revision: x");
    }

    #[test]
    fn an_empty_revision_is_refused_with_a_hint() {
        assert_eq!(
            message("user:x@"),
            "Bad revision: nothing after '@' in user:x@ (write user:x@N, or leave out '@' for the latest revision)"
        );
    }

    #[test]
    fn signed_and_underscored_revisions_that_python_accepts_are_refused() {
        for text in ["x@-1", "x@+1", "x@1_0", "x@ 1"] {
            let revision = &text[2..];
            assert_eq!(
                message(text),
                format!("Bad revision: {revision} (a revision is a plain number: 0, 1, 2, ...)")
            );
        }
    }

    #[test]
    fn a_revision_beyond_u64_is_too_large() {
        assert_eq!(
            message("x@99999999999999999999999"),
            "Bad revision: 99999999999999999999999 is too large"
        );
    }

    #[test]
    fn a_second_colon_is_refused_instead_of_dropping_the_rest() {
        assert_eq!(
            message("a:b:c"),
            "Bad image URI a:b:c: more than one ':' (expected [REPO:]IMAGE[@REVISION])"
        );
    }

    #[test]
    fn a_second_at_is_refused_instead_of_joining_it_to_the_name() {
        assert_eq!(
            message("img1@0@1"),
            "Bad image URI img1@0@1: more than one '@' (expected [REPO:]IMAGE[@REVISION])"
        );
    }

    #[test]
    fn names_are_checked_with_pcoccs_messages() {
        assert_eq!(message("user:"), "Empty object name");
        assert_eq!(message("@1"), "Empty object name");
        assert_eq!(
            message("bad name"),
            "Object name contains invalid characters"
        );
        assert_eq!(
            message("bad/name"),
            "Object name contains invalid characters"
        );
        assert_eq!(message("r:é"), "Object name contains invalid characters");
    }
}
