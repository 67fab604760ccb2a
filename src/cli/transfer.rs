//! `pcocc image import` and `pcocc image export`: the format of the file is decided here
//! ([`super::guess`]), the tree does the work ([`crate::tree::Tree::import_file`] and
//! [`crate::tree::Tree::export_file`], the same code paths as a `cp` onto or off the
//! mount), and what is printed between the steps is pcocc's, in pcocc's order:
//!
//! * import: destination URI, repository, format (pcocc's warning when raw is assumed),
//!   "already exists", the "another repo" warning, `Storing image in repository 'R' as
//!   'N' ... `, then "not an image file" for a missing source, `Copying image...` (a qcow2
//!   source) or `Converting image...`, and the conversion;
//! * export: the source revision, the format (refusing to overwrite a file of another
//!   format), `Copying image...` (qcow2) or `Converting image...`, and the conversion.
//!
//! Unlike pcocc, a failing conversion is an error that names the file (exit 255) and leaves
//! nothing behind, instead of a traceback and a stray scratch file.
//!
//! Both commands take the `KIND` argument of older pcocc releases (`import vm SRC DEST`),
//! which may only be `vm`.

use super::guess::{self, Guess, Side};
use super::progress::Progress;
use super::style::Colour;
use super::{CliError, Context};
use crate::image::Format;
use crate::tree::{self, Uri};

/// The only image kind older pcocc releases' `KIND` argument may name here.
pub const VM_KIND: &str = "vm";

/// Printed before a transfer whose file is a qcow2, like the stored layers (pcocc's text).
const COPYING: &str = "Copying image...";
/// Printed before a transfer that converts (pcocc's text).
const CONVERTING: &str = "Converting image...";

/// The SOURCE and DEST of `import`/`export` from their two or three operands: with three,
/// the first is the old `KIND` and must be `vm`. `usage` is the command's usage line, for
/// the usage error.
pub fn operands(
    first: &str,
    second: &str,
    third: Option<&str>,
    usage: &'static str,
) -> Result<(String, String), CliError> {
    match third {
        None => Ok((first.to_string(), second.to_string())),
        Some(dest) if first == VM_KIND => Ok((second.to_string(), dest.to_string())),
        Some(_) => Err(CliError::Usage {
            usage,
            message: format!(
                "Invalid value for 'KIND': '{first}' is not '{VM_KIND}' (only VM images are handled; leave KIND out)."
            ),
        }),
    }
}

/// What comes before a transfer of a file in `format`.
fn announcement(format: Format) -> &'static str {
    if format == Format::Qcow2 {
        COPYING
    } else {
        CONVERTING
    }
}

/// `pcocc image import [-t FMT] SOURCE DEST`.
pub fn import(
    ctx: &mut Context,
    fmt: Option<&str>,
    source: &str,
    dest: &str,
) -> Result<(), CliError> {
    let dest = Uri::parse(dest)?;
    // A name no image can have (`.`, `..`, too long for its metadata file) is refused
    // before anything is read or said.
    tree::validate_new_name(&dest.name)?;
    let repo = destination_repo(ctx, &dest)?;
    let Guess {
        path,
        format,
        assumed_raw,
        ..
    } = guess::guess(fmt, source, Side::Import)?;
    if assumed_raw {
        log::warn!("Could not detect image format, assuming raw VM");
    }
    if has_image(ctx, &repo, &dest.name) {
        return Err(tree::Error::ImageExists {
            name: dest.name,
            repo,
        }
        .into());
    }
    for other in ctx.tree.repo_names() {
        if other != repo && has_image(ctx, other, &dest.name) {
            let warning = format!(
                "Warning: an image with name {} already exists in another repo ({other})",
                dest.name
            );
            ctx.out.coloured_line(&warning, Colour::Magenta)?;
            break;
        }
    }
    ctx.out.line(&format!(
        "Storing image in repository '{repo}' as '{}' ... ",
        dest.name
    ))?;
    if !guess::is_importable(&path) {
        return Err(CliError::NotAnImage(path.display().to_string()));
    }
    ctx.out.line(announcement(format))?;
    ctx.out.flush()?;
    let target = Uri {
        repo: Some(repo),
        name: dest.name,
        revision: None,
    };
    let mut bar = Progress::stderr();
    let result = ctx.tree.import_file(
        &ctx.caller,
        &path,
        Some(format),
        &target,
        &mut |done, total| bar.update(done, total),
    );
    bar.finish();
    let stored = result?;
    log::info!(
        "imported {} as {}:{}@{} ({} layer)",
        path.display(),
        stored.repo,
        stored.meta.name,
        stored.meta.revision,
        stored.meta.data_blobs.join(", ")
    );
    Ok(())
}

/// `pcocc image export [-t FMT] SOURCE DEST`.
pub fn export(
    ctx: &mut Context,
    fmt: Option<&str>,
    source: &str,
    dest: &str,
) -> Result<(), CliError> {
    let source = Uri::parse(source)?;
    let found = ctx.tree.resolve(&ctx.caller, &source)?;
    let Guess {
        path,
        format,
        defaulted,
        ..
    } = guess::guess(fmt, dest, Side::Export)?;
    if !tree::is_vm(&found.meta) {
        // pcocc refuses a VM format for another kind, and hands a container image with
        // no format to skopeo, which this project does not do.
        return Err(if defaulted {
            CliError::NotAVmImage {
                name: found.meta.name,
                kind: found.meta.kind,
            }
        } else {
            CliError::KindFormat {
                format: format.name(),
                kind: found.meta.kind,
            }
        });
    }
    ctx.out.line(announcement(format))?;
    ctx.out.flush()?;
    let revision = Uri {
        repo: Some(found.repo),
        name: found.meta.name,
        revision: Some(found.meta.revision),
    };
    let mut bar = Progress::stderr();
    let result = ctx
        .tree
        .export_file(&ctx.caller, &revision, format, &path, &mut |done, total| {
            bar.update(done, total)
        });
    bar.finish();
    result?;
    log::info!("exported {revision} to {} as {format}", path.display());
    Ok(())
}

/// The repository an import goes to: the one named (`Unknown repository R` if none is
/// configured by that name), else the default one.
fn destination_repo(ctx: &Context, dest: &Uri) -> Result<String, CliError> {
    match dest.repo.as_deref() {
        Some(name) if !name.is_empty() => {
            if ctx.tree.repo_names().contains(&name) {
                Ok(name.to_string())
            } else {
                Err(tree::Error::UnknownRepo(name.to_string()).into())
            }
        }
        _ => Ok(ctx.tree.default_repo()?.to_string()),
    }
}

/// True when `repo` has an image called `name` that the caller can see. Only decides
/// which message comes first: the import itself refuses an existing name atomically.
fn has_image(ctx: &Context, repo: &str, name: &str) -> bool {
    ctx.tree
        .revisions(&ctx.caller, repo, name)
        .is_ok_and(|revisions| !revisions.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    const USAGE: &str = "pcocc image import [OPTIONS] [KIND] SOURCE DEST";

    #[test]
    fn two_operands_are_source_and_destination() {
        let (s, d) = operands("disk.qcow2", "img", None, USAGE).unwrap();
        assert_eq!((s.as_str(), d.as_str()), ("disk.qcow2", "img"));
    }

    #[test]
    fn three_operands_start_with_the_vm_kind() {
        let (s, d) = operands("vm", "disk.qcow2", Some("img"), USAGE).unwrap();
        assert_eq!((s.as_str(), d.as_str()), ("disk.qcow2", "img"));
    }

    #[test]
    fn another_kind_is_a_usage_error_that_names_it() {
        let e = operands("cont", "x", Some("y"), USAGE).unwrap_err();
        assert!(
            matches!(&e, CliError::Usage { usage, message } if *usage == USAGE && message.contains("'cont' is not 'vm'")),
            "{e:?}"
        );
    }

    #[test]
    fn only_qcow2_files_are_copied_the_rest_converted() {
        assert_eq!(announcement(Format::Qcow2), "Copying image...");
        for f in Format::ALL.into_iter().filter(|f| *f != Format::Qcow2) {
            assert_eq!(announcement(f), "Converting image...");
        }
    }
}
