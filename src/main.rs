//! The `turnd` binary: parse arguments, load the config, hand over to the library.

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use turnd::cli::{self, Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match cli::load_config(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("turnd: invalid configuration: {e}");
            return ExitCode::from(cli::EXIT_BAD_CONFIG);
        }
    };
    if let Command::CheckConfig = cli.command {
        print!("{}", config.redacted_toml());
        return ExitCode::SUCCESS;
    }
    turnd::logging::init(&config, matches!(cli.command, Command::Run));
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
            Command::CheckConfig => Ok(ExitCode::SUCCESS),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("turnd: {}", cli::one_line(&e));
            ExitCode::FAILURE
        }
    }
}
