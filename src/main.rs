//! The `turnd` binary: parse arguments, load the config, hand over to the library.

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use turnd::cli::{self, Cli, Command};

fn main() -> ExitCode {
    // First, for every subcommand: each reads secrets (database and broker URLs, the admin
    // token) from its environment and config, and a non-dumpable process's /proc/<pid>/environ,
    // mem, fd/… are closed to every other process of the same user (workers included) that
    // lacks CAP_SYS_PTRACE (CONTRACT §5).
    if let Err(e) = turnd::worker::sandbox::make_undumpable() {
        eprintln!("turnd: cannot make the process non-dumpable: {e}");
        return ExitCode::FAILURE;
    }
    let cli = Cli::parse();
    let config = match cli::load_config(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("turnd: invalid configuration: {e}");
            return ExitCode::from(cli::EXIT_BAD_CONFIG);
        }
    };
    // A sandbox this kernel cannot give is a configuration error (exit 2 naming the key),
    // for `run` and for `check-config` on the host it is meant for.
    if let Command::Run | Command::CheckConfig = cli.command
        && let Err(e) = turnd::worker::sandbox::check(&config.worker)
    {
        eprintln!("turnd: invalid configuration: {e}");
        return ExitCode::from(cli::EXIT_BAD_CONFIG);
    }
    if let Command::CheckConfig = cli.command {
        print!("{}", config.redacted_toml());
        return ExitCode::SUCCESS;
    }
    if let Err(e) = turnd::logging::init(&config, matches!(cli.command, Command::Run)) {
        eprintln!("turnd: invalid configuration: {e}");
        return ExitCode::from(cli::EXIT_BAD_CONFIG);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("turnd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<ExitCode> = runtime.block_on(async {
        match &cli.command {
            Command::Run => {
                turnd::daemon::run(config, cli.config.clone(), CancellationToken::new()).await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Migrate => cli::migrate(&config).await.map(|()| ExitCode::SUCCESS),
            Command::Status { json, .. } => {
                cli::status(&config, *json).await.map(|()| ExitCode::SUCCESS)
            }
            Command::Send(args) => cli::send(&config, args).await,
            Command::Parked { action, .. } => cli::parked(&config, action).await,
            Command::Cancel { message_ids, deployment, json } => {
                cli::cancel(&config, message_ids, deployment.as_deref(), *json).await
            }
            Command::Audit { action, limit, json } => {
                cli::audit(&config, action.as_deref(), *limit, *json)
                    .await
                    .map(|()| ExitCode::SUCCESS)
            }
            Command::CheckConfig => Ok(ExitCode::SUCCESS),
        }
    });
    // Spans still queued for export go out now (bounded by the export timeout).
    turnd::otel::shutdown();
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("turnd: {}", cli::one_line(&e));
            ExitCode::FAILURE
        }
    }
}
