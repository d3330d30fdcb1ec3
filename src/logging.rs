//! The log: tracing to stderr (pretty or JSON), with a filter that SIGHUP can replace while
//! the daemon runs (`log.level`), through a reload layer set up once per process; and the
//! OpenTelemetry layer that makes turn spans (`crate::otel`) of target `turnd::otel` only.

use std::sync::OnceLock;

use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::config::{Config, LogFormat};

static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// The filter for `level`, as `log.level` means it (an invalid one falls back to `info`;
/// `check-config` already refused it).
fn filter(level: &str, daemon: bool) -> EnvFilter {
    let mut filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    // A doorbell to a deployment nobody owns comes back by design (mandatory publish); lapin
    // would log each one at WARN. A one-shot command reports its own errors in one line, so
    // lapin's own account of a refused connection would only say it again.
    let quiet = if daemon { "lapin::returned_messages=error" } else { "lapin=off" };
    if !level.contains("lapin")
        && let Ok(d) = quiet.parse()
    {
        filter = filter.add_directive(d);
    }
    // Turn spans whatever the level while they are exported, never otherwise: made for
    // nobody they cost ~0.1 ms of CPU per turn, and contexts are then handed on by hand
    // (`otel::hand_on`). They log nothing by themselves; the events inside them keep their
    // own levels.
    let spans = if crate::otel::exporting() { "info" } else { "off" };
    if !level.contains(crate::otel::TARGET)
        && let Ok(d) = format!("{}={spans}", crate::otel::TARGET).parse()
    {
        filter = filter.add_directive(d);
    }
    filter
}

/// Installs the process's subscriber. `daemon`: `turnd run` (lapin's warnings are kept, and
/// spans are exported when `otel.endpoint` is set).
///
/// # Errors
///
/// The OTLP exporter could not be built (the endpoint was validated already).
pub fn init(config: &Config, daemon: bool) -> Result<(), crate::otel::Error> {
    // The tracer first: the filter lets turn spans through only when it exports.
    let tracer = crate::otel::tracer(config, daemon)?;
    let (layer, handle) = reload::Layer::new(filter(&config.log.level, daemon));
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        // Spans only: log events stay in the log, and a span's attributes are its fields.
        .with_location(false)
        .with_threads(false)
        // Turn spans are never entered: busy/idle times would say nothing.
        .with_tracked_inactivity(false)
        .with_filter(tracing_subscriber::filter::filter_fn(|m| m.target() == crate::otel::TARGET));
    // Colours only on a terminal: under systemd or in a pod the log is a file, and escape
    // codes there only hide what a grep looks for.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(std::io::stderr);
    let installed = match config.log.format {
        LogFormat::Json => {
            // The current span's fields (an owner's `deployment` and `epoch`) go under
            // "span"; the list of every enclosing span would only repeat them.
            let json = fmt.json().flatten_event(true).with_current_span(true).with_span_list(false);
            Registry::default().with(layer).with(otel).with(json).try_init()
        }
        LogFormat::Pretty => Registry::default().with(layer).with(otel).with(fmt).try_init(),
    };
    if installed.is_ok() {
        let _ = FILTER.set(handle);
    }
    Ok(())
}

/// Replaces the filter with `level` (SIGHUP). An error says why; the old filter stays.
pub fn set_level(level: &str) -> Result<(), String> {
    EnvFilter::try_new(level).map_err(|e| format!("log.level {level:?}: {e}"))?;
    let Some(handle) = FILTER.get() else {
        return Err("the log was not set up by turnd (a test's subscriber?)".to_owned());
    };
    handle.reload(filter(level, true)).map_err(|e| format!("cannot replace the log filter: {e}"))
}
