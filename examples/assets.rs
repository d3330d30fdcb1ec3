//! Writes what the Debian package ships besides the binaries, generated from the clap
//! definitions in `turnd::cli`: shell completions (bash, zsh, fish) and the man pages
//! (`turnd.1` and one per subcommand, `turnd-status.1`, …).
//!
//! `cargo run --example assets -- OUT_DIR` (scripts/deb.sh runs it). An example, not a binary:
//! a release build of the daemon does not build it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;

fn main() -> ExitCode {
    let Some(out) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: assets OUT_DIR");
        return ExitCode::from(2);
    };
    match write(&out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("assets: cannot write into {}: {e}", out.display());
            ExitCode::FAILURE
        }
    }
}

fn write(out: &std::path::Path) -> std::io::Result<()> {
    let completions = out.join("completions");
    let man = out.join("man");
    std::fs::create_dir_all(&completions)?;
    std::fs::create_dir_all(&man)?;
    let mut cmd = turnd::cli::Cli::command();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, "turnd", &completions)?;
    }
    clap_mangen::generate_to(cmd, &man)?;
    Ok(())
}
