//! `postern completions SHELL` and `postern man [--dir DIR]`: generated from the clap
//! command definition, so they never drift from `--help`.
//!
//! Owns: writing them. Must not touch: the commands themselves (see `main.rs`).

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::CommandFactory as _;

/// Prints the completion script for `shell` to stdout.
pub(crate) fn completions(shell: clap_complete::Shell) -> Result<()> {
    let mut cmd = crate::Cli::command();
    clap_complete::generate(shell, &mut cmd, "postern", &mut std::io::stdout());
    Ok(())
}

/// Prints `postern.1` to stdout, or writes it and one page per subcommand into `dir`.
pub(crate) fn man(dir: Option<PathBuf>) -> Result<()> {
    let cmd = crate::Cli::command();
    match dir {
        None => {
            let mut out = std::io::stdout().lock();
            clap_mangen::Man::new(cmd)
                .render(&mut out)
                .context("write the man page")?;
        }
        Some(dir) => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("--dir {}: cannot create", dir.display()))?;
            clap_mangen::generate_to(cmd, &dir)
                .with_context(|| format!("--dir {}: cannot write the pages", dir.display()))?;
            eprintln!("man pages written to {}", dir.display());
        }
    }
    Ok(())
}
