//! Image URIs, `[REPO:]IMAGE[@REVISION]`, as pcocc spells them, minus pcocc's quirks:
//! a third `:` part, an empty or signed revision are errors instead of being dropped or
//! accepted.

use super::Error;

/// A parsed `[REPO:]IMAGE[@REVISION]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uri {
    /// `None`: no `REPO:` was given (lookups search every repository in priority order).
    /// `Some("")`: an empty repository (`:IMAGE`), which pcocc reads as the default one.
    pub repo: Option<String>,
    /// The image name, not yet validated (see [`super::validate_name`]).
    pub name: String,
    /// `None` means the latest revision (for lookups) or all revisions (for delete).
    pub revision: Option<u64>,
}

impl Uri {
    /// Parses a URI. The revision is split off at the last `@` and must be a plain
    /// decimal number (`Bad revision: X` otherwise, as pcocc says); the rest is split on
    /// `:` into at most a repository and a name.
    pub fn parse(s: &str) -> Result<Uri, Error> {
        let (rest, revision) = match s.rsplit_once('@') {
            Some((rest, rev)) => {
                let ok = !rev.is_empty() && rev.bytes().all(|b| b.is_ascii_digit());
                let n = rev
                    .parse::<u64>()
                    .ok()
                    .filter(|_| ok)
                    .ok_or_else(|| Error::BadRevision(rev.to_string()))?;
                (rest, Some(n))
            }
            None => (s, None),
        };
        let mut parts = rest.split(':');
        let first = parts.next().unwrap_or_default();
        match (parts.next(), parts.next()) {
            (None, _) => Ok(Uri {
                repo: None,
                name: first.to_string(),
                revision,
            }),
            (Some(name), None) => Ok(Uri {
                repo: Some(first.to_string()),
                name: name.to_string(),
                revision,
            }),
            (Some(_), Some(_)) => Err(Error::BadUri(s.to_string())),
        }
    }
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
