//! The `turnd` binary: parse arguments, load the config, hand over to the library.

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use turnd::cli::{self, Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let arg = match &cli.command {
        Command::Run(c) | Command::Migrate(c) | Command::CheckConfig(c) => c,
        Command::Status { config, .. } => config,
        Command::Send(args) => &args.config,
        Command::Parked { config, .. } => config,
    };
    let config = match cli::load_config(arg) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("turnd: invalid configuration: {e}");
            return ExitCode::from(cli::EXIT_BAD_CONFIG);
        }
    };
    if let Command::CheckConfig(_) = cli.command {
        print!("{}", config.redacted_toml());
        return ExitCode::SUCCESS;
    }
    cli::init_logging(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("turnd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<ExitCode> = runtime.block_on(async {
        match &cli.command {
            Command::Run(_) => {
                turnd::daemon::run(config, CancellationToken::new()).await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Migrate(_) => cli::migrate(&config).await.map(|()| ExitCode::SUCCESS),
            Command::Status { json, .. } => {
                cli::status(&config, *json).await.map(|()| ExitCode::SUCCESS)
            }
            Command::Send(args) => cli::send(&config, args).await,
            Command::Parked { action, .. } => cli::parked(&config, action).await,
            Command::CheckConfig(_) => Ok(ExitCode::SUCCESS),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("turnd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
