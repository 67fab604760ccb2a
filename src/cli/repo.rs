//! `pcocc image repo list | gc`.

use std::time::Duration;

use super::table::Table;
use super::{CliError, Context};

/// `pcocc image repo list`: name, path and whether the caller may write each repository
/// (`N/A` when its path is missing), in priority order.
pub fn list(ctx: &mut Context) -> Result<(), CliError> {
    let mut table = Table::new(&["name", "path", "writable"]);
    for repo in ctx.tree.repo_list(&ctx.caller) {
        let writable = match repo.writable {
            Some(true) => "True",
            Some(false) => "False",
            None => "N/A",
        };
        table.push(vec![
            repo.name,
            repo.path.display().to_string(),
            writable.to_string(),
        ]);
    }
    ctx.out.text(&table.render())?;
    Ok(())
}

/// `pcocc image repo gc REPO`: prints nothing. The store logs each removal at info level
/// (`pcocc -v`); this adds one summary line.
/// `grace` replaces the tree's default grace period.
pub fn gc(ctx: &mut Context, repo: &str, grace: Option<Duration>) -> Result<(), CliError> {
    let report = ctx.tree.gc(&ctx.caller, repo, grace)?;
    log::info!(
        "{repo}: {} unused layers removed, {} kept (added within the grace period), {} scratch entries removed",
        report.layers_removed.len(),
        report.layers_kept_fresh.len(),
        report.tmp_removed.len()
    );
    Ok(())
}
