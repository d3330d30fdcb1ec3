//! Tracing a turn end to end: its W3C trace context (`traceparent`, `tracestate`), taken from
//! the producer and kept with the turn in PostgreSQL, and one OpenTelemetry span per stage,
//! all in the producer's trace:
//!
//! ```text
//! producer span (traceparent header, or platformMetadata.traceparent)
//!   └─ turnd.intake ─── turnd.arm                      (intake daemon; its context is stored)
//!        └─ turnd.claim ─ turnd.worker ─ turnd.commit  (owner daemon; the worker gets turnd.worker's)
//!                                          └─ turnd.relay (any daemon; the event carries its context)
//! ```
//!
//! A turn that fails without its worker's answer (crash, timeout, take-over) has no commit span:
//! its event's relay span hangs off the stored context (turnd.intake). Spans are `tracing`
//! spans of target [`TARGET`], turned into OpenTelemetry spans by `tracing-opentelemetry`
//! (a layer that sees only that target), so the JSON log lines inside them carry `trace_id`.
//! Export is OTLP over HTTP with JSON bodies, batched on the SDK's own thread behind a bounded
//! queue: a full queue drops spans (counted), never waits.
//!
//! Without export (`otel.endpoint` unset) no span is made (the log filter turns the target
//! off: each span macro is then a cached no): six spans a turn, recorded for nobody, cost the
//! daemon ~0.1 ms of CPU per turn (a quarter of its share; measured with `turnd-bench
//! throughput`). The contexts still travel, derived by hand ([`hand_on`]): each
//! stage hands on a child of the context it got (same trace and flags, a span id of its own),
//! so the worker and the reply get a trace context either way.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, IdGenerator, RandomIdGenerator, Sampler,
    SdkTracerProvider, SpanData, SpanExporter, SpanProcessor,
};
use prometheus_client::metrics::counter::Counter;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::config::Config;

/// The `tracing` target of turn spans: the OpenTelemetry layer sees only these, and the log
/// filter always lets them through (without them there is no context to hand on).
pub const TARGET: &str = "turnd::otel";

/// Longest `traceparent` taken (version 00 is 55 bytes; later versions may append fields).
const MAX_TRACEPARENT: usize = 256;
/// Longest `tracestate` taken: W3C asks to propagate at least 512 bytes; more is dropped
/// whole (a truncated list could split a vendor's entry).
const MAX_TRACESTATE: usize = 512;

/// A W3C trace context as it travels: in AMQP headers, the worker's envelope, the turn row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    pub traceparent: String,
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// The context if `traceparent` is a valid W3C one (a bad `tracestate` is left out).
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<TraceContext> {
        if traceparent.len() > MAX_TRACEPARENT || !well_formed(traceparent) {
            return None;
        }
        let tracestate = tracestate.filter(|s| !s.is_empty() && s.len() <= MAX_TRACESTATE);
        // Re-rendered: what is stored and handed on is canonical (version 00).
        of_context(&extract(traceparent, tracestate))
    }

    /// The 32 hex digits of the trace id.
    /// A span of this context's trace: the same trace id, flags and `tracestate`, a new span id.
    pub fn child(&self) -> TraceContext {
        let span_id = RandomIdGenerator::default().new_span_id();
        let (trace_id, flags) = (self.trace_id(), self.traceparent.get(53..55).unwrap_or("01"));
        TraceContext {
            traceparent: format!("00-{trace_id}-{span_id}-{flags}"),
            tracestate: self.tracestate.clone(),
        }
    }

    /// A new trace, sampled with probability `ratio` (as the SDK's ratio sampler decides: by
    /// the trace id's low bits).
    pub fn root(ratio: f64) -> TraceContext {
        let ids = RandomIdGenerator::default();
        let trace_id = ids.new_trace_id();
        let low = u64::from_be_bytes(trace_id.to_bytes()[8..].try_into().unwrap_or([0; 8])) >> 1;
        let sampled = ratio >= 1.0 || (low as f64) < ratio * (1u64 << 63) as f64;
        TraceContext {
            traceparent: format!("00-{trace_id}-{}-0{}", ids.new_span_id(), u8::from(sampled)),
            tracestate: None,
        }
    }

    pub fn trace_id(&self) -> &str {
        self.traceparent.get(3..35).unwrap_or("")
    }

    /// The 16 hex digits of the parent (span) id.
    pub fn span_id(&self) -> &str {
        self.traceparent.get(36..52).unwrap_or("")
    }

    fn context(&self) -> opentelemetry::Context {
        extract(&self.traceparent, self.tracestate.as_deref())
    }
}

/// W3C Trace Context level 1, strictly (the SDK's parser takes short ids): lowercase hex,
/// version not `ff`, version 00 exactly 55 bytes, a later version 55 bytes or more with a `-`
/// after them, ids not all zeros.
fn well_formed(tp: &str) -> bool {
    let b = tp.as_bytes();
    let hex = |r: std::ops::Range<usize>| {
        b.get(r).is_some_and(|s| s.iter().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c)))
    };
    let zeros = |r: std::ops::Range<usize>| b[r].iter().all(|c| *c == b'0');
    let shape = b.len() >= 55
        && hex(0..2)
        && hex(3..35)
        && hex(36..52)
        && hex(53..55)
        && [b[2], b[35], b[52]] == [b'-'; 3];
    shape
        && &b[0..2] != b"ff"
        && !zeros(3..35)
        && !zeros(36..52)
        && if &b[0..2] == b"00" { b.len() == 55 } else { b.len() == 55 || b[55] == b'-' }
}

fn extract(traceparent: &str, tracestate: Option<&str>) -> opentelemetry::Context {
    let mut carrier = HashMap::with_capacity(2);
    carrier.insert("traceparent".to_owned(), traceparent.to_owned());
    if let Some(state) = tracestate {
        carrier.insert("tracestate".to_owned(), state.to_owned());
    }
    TraceContextPropagator::new().extract(&carrier)
}

/// The W3C strings of a context's span, if it has a valid one.
fn of_context(cx: &opentelemetry::Context) -> Option<TraceContext> {
    let span = cx.span();
    let sc = span.span_context();
    if !sc.is_valid() {
        return None;
    }
    let traceparent =
        format!("00-{}-{}-{:02x}", sc.trace_id(), sc.span_id(), sc.trace_flags().to_u8());
    let tracestate = Some(sc.trace_state().header()).filter(|s| !s.is_empty());
    Some(TraceContext { traceparent, tracestate })
}

/// The context of `span`; None when no OpenTelemetry layer is installed (a test's own
/// subscriber) or the span is none.
fn context_of(span: &Span) -> Option<TraceContext> {
    of_context(&span.context())
}

/// Whether turn spans are made (export is on); set once by [`tracer`].
static EXPORTING: AtomicBool = AtomicBool::new(false);
/// `otel.sample_ratio`, for the traces started without spans.
static ROOT_RATIO: OnceLock<f64> = OnceLock::new();

/// Whether export is on (then the log filter lets turn spans through: `crate::logging`).
pub(crate) fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// The context a stage hands on (to the worker, in the event's headers): its span's when
/// spans are made, else a child of `parent`, the context the stage got (None stays None).
pub fn hand_on(span: &Span, parent: Option<&TraceContext>) -> Option<TraceContext> {
    if exporting() { context_of(span) } else { parent.map(TraceContext::child) }
}

/// The context stored with a turn at intake: `intake`'s when spans are made, else a child of
/// the producer's, or the root of a new trace (sampled at `otel.sample_ratio`).
pub fn hand_on_root(intake: &Span, producer: Option<&TraceContext>) -> Option<TraceContext> {
    if exporting() {
        return context_of(intake);
    }
    let ratio = ROOT_RATIO.get().copied().unwrap_or(1.0);
    Some(producer.map_or_else(|| TraceContext::root(ratio), TraceContext::child))
}

/// Parents `span` on `parent` (a remote or stored context; none: `span` keeps its `tracing`
/// parent, or starts a trace) and records its trace id for the log. Spans parented this way
/// are `tracing` roots (`parent: None`): whatever span happens to be current is not theirs.
fn attach(span: Span, parent: Option<&TraceContext>) -> Span {
    if let Some(parent) = parent {
        let _ = span.set_parent(parent.context());
    }
    if let Some(cx) = context_of(&span) {
        span.record("trace_id", cx.trace_id());
    }
    span
}

/// A turn taken from the inbox, parented on the producer's context.
pub fn intake_span(parent: Option<&TraceContext>, deployment: &str, message_id: &str) -> Span {
    let span = tracing::info_span!(target: TARGET, parent: None, "turnd.intake", otel.kind = "consumer",
        deployment, message_id, trace_id = tracing::field::Empty);
    attach(span, parent)
}

/// The turn's row written (a child of its intake span).
pub fn arm_span(intake: &Span, deployment: &str, message_id: &str) -> Span {
    let span = tracing::info_span!(target: TARGET, parent: intake, "turnd.arm",
        deployment, message_id, armed = tracing::field::Empty, trace_id = tracing::field::Empty);
    attach(span, None)
}

/// The turn claimed by its owner, parented on the stored context.
pub fn claim_span(
    stored: Option<&TraceContext>,
    deployment: &str,
    epoch: i64,
    message_id: &str,
    waited: Duration,
) -> Span {
    let span = tracing::info_span!(target: TARGET, parent: None, "turnd.claim", deployment, epoch, message_id,
        waited_ms = waited.as_millis() as u64, trace_id = tracing::field::Empty);
    attach(span, stored)
}

/// From the turn's line written to the worker until its answer (or its end without one). Its
/// parent is the claim's context, not the `tracing` span: that would keep the claim span open
/// (and unexported) for as long as the worker works.
pub fn worker_span(claim: &Span, deployment: &str, epoch: i64, message_id: &str) -> Span {
    let span = tracing::info_span!(target: TARGET, parent: None, "turnd.worker", deployment,
        epoch, message_id, otel.status_code = tracing::field::Empty, trace_id = tracing::field::Empty);
    attach(span, context_of(claim).as_ref())
}

/// The worker's answer committed (the election and the outbox row).
pub fn commit_span(
    worker: &Span,
    deployment: &str,
    epoch: i64,
    message_id: &str,
    kind: &str,
) -> Span {
    let span = tracing::info_span!(target: TARGET, parent: worker, "turnd.commit", deployment,
        epoch, message_id, kind, committed = tracing::field::Empty, trace_id = tracing::field::Empty);
    attach(span, None)
}

/// The terminal event published, parented on the context stored with it.
pub fn relay_span(stored: Option<&TraceContext>, deployment: &str, message_id: &str) -> Span {
    let span = tracing::info_span!(target: TARGET, parent: None, "turnd.relay", otel.kind = "producer",
        deployment, message_id, trace_id = tracing::field::Empty);
    attach(span, stored)
}

/// Marks a span as failed (OpenTelemetry status ERROR).
pub fn set_error(span: &Span) {
    span.record("otel.status_code", "ERROR");
}

// ---- export --------------------------------------------------------------------------------

/// Export counters, registered by `metrics` (they exist before its registry does).
#[derive(Debug, Default)]
pub struct Stats {
    /// Spans handed to the exporter.
    pub exported: Counter,
    /// Spans dropped because the export queue was full.
    pub dropped: Counter,
    /// Spans in batches the collector did not take (unreachable, refused).
    pub failed: Counter,
}

pub static STATS: LazyLock<Stats> = LazyLock::new(Stats::default);

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Why OpenTelemetry could not be set up (only when export is configured).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("otel.endpoint {endpoint:?}: cannot build the OTLP exporter: {source}")]
    Exporter {
        endpoint: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// The tracer for the `tracing-opentelemetry` layer: sampling as configured and, when
/// `otel.endpoint` is set (`export`), the bounded batch exporter. Installed once per process;
/// [`shutdown`] flushes it.
pub fn tracer(config: &Config, export: bool) -> Result<opentelemetry_sdk::trace::Tracer, Error> {
    let otel = &config.otel;
    let _ = ROOT_RATIO.set(otel.sample_ratio);
    // Parent-based: a producer's decision stands (its flag travels on); a turn that starts a
    // trace is sampled at the configured ratio.
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(otel.sample_ratio)));
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(otel.service_name.clone())
        .with_attribute(opentelemetry::KeyValue::new(
            "service.instance.id",
            config.daemon.id.clone(),
        ))
        .build();
    let mut builder = SdkTracerProvider::builder().with_sampler(sampler).with_resource(resource);
    if export && let Some(endpoint) = otel.endpoint.as_deref() {
        use opentelemetry_otlp::WithExportConfig;
        EXPORTING.store(true, Ordering::Relaxed);
        let url = traces_url(endpoint);
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpJson)
            .with_endpoint(url.clone())
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|source| Error::Exporter { endpoint: url, source })?;
        let in_queue = Arc::new(AtomicUsize::new(0));
        let batch =
            BatchSpanProcessor::builder(Counted { inner: exporter, in_queue: in_queue.clone() })
                .with_batch_config(
                    BatchConfigBuilder::default()
                        .with_max_queue_size(otel.queue_size)
                        .with_max_export_batch_size(otel.queue_size.min(512))
                        .build(),
                )
                .build();
        builder =
            builder.with_span_processor(Bounded { inner: batch, in_queue, cap: otel.queue_size });
    }
    let provider = builder.build();
    let tracer = provider.tracer("turnd");
    let _ = PROVIDER.set(provider);
    Ok(tracer)
}

/// How long one export request may take (the SDK's thread waits for it, never a turn).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// `otel.endpoint` is a base URL, as `OTEL_EXPORTER_OTLP_ENDPOINT` is; traces go to `/v1/traces`.
pub fn traces_url(endpoint: &str) -> String {
    format!("{}/v1/traces", endpoint.trim_end_matches('/'))
}

/// Flushes what is queued (bounded by the SDK's timeout) and stops the export thread.
pub fn shutdown() {
    if let Some(provider) = PROVIDER.get() {
        let _ = provider.shutdown_with_timeout(EXPORT_TIMEOUT);
    }
}

/// The batch processor behind a bound of our own: the SDK drops silently when its queue is
/// full; this counts what it drops. `in_queue` is spans handed on and not yet taken by an
/// export, never fewer than the SDK's queue holds, so with `cap` equal to its size the SDK
/// itself never drops.
#[derive(Debug)]
struct Bounded {
    inner: BatchSpanProcessor,
    in_queue: Arc<AtomicUsize>,
    cap: usize,
}

impl SpanProcessor for Bounded {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &opentelemetry::Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        let taken = self
            .in_queue
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.cap).then_some(n + 1));
        match taken {
            Ok(_) => self.inner.on_end(span),
            Err(_) => {
                STATS.dropped.inc();
            }
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// The OTLP exporter, counting what it is given and what it could not deliver.
#[derive(Debug)]
struct Counted<E> {
    inner: E,
    in_queue: Arc<AtomicUsize>,
}

impl<E: SpanExporter> SpanExporter for Counted<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        self.in_queue.fetch_sub(n.min(self.in_queue.load(Ordering::Acquire)), Ordering::AcqRel);
        STATS.exported.inc_by(n as u64);
        let result = self.inner.export(batch).await;
        if result.is_err() {
            STATS.failed.inc_by(n as u64);
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_is_kept_and_canonical() {
        let cx = TraceContext::parse(TP, Some("congo=t61rcWkgMzE")).unwrap();
        assert_eq!(cx.traceparent, TP);
        assert_eq!(cx.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
        assert_eq!(cx.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(cx.span_id(), "00f067aa0ba902b7");
        let upper = TP.to_uppercase();
        // W3C: uppercase hex is invalid; the propagator refuses it rather than guessing.
        assert!(TraceContext::parse(&upper, None).is_none());
    }

    #[test]
    fn invalid_contexts_are_ignored() {
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert!(TraceContext::parse(bad, None).is_none(), "{bad:?}");
        }
        let long = format!("{TP}-{}", "a".repeat(300));
        assert!(TraceContext::parse(&long, None).is_none());
        // A tracestate too long is dropped, the traceparent kept.
        let cx = TraceContext::parse(TP, Some(&format!("a={}", "b".repeat(600)))).unwrap();
        assert_eq!(cx.tracestate, None);
    }

    #[test]
    fn without_spans_a_stage_hands_on_a_child_or_a_new_root() {
        let parent = TraceContext::parse(TP, Some("congo=t61rcWkgMzE")).unwrap();
        let child = parent.child();
        assert_eq!(
            TraceContext::parse(&child.traceparent, None).as_ref().map(|c| c.trace_id()),
            Some(parent.trace_id())
        );
        assert_eq!((child.trace_id(), &child.traceparent[53..]), (parent.trace_id(), "01"));
        assert_ne!(child.span_id(), parent.span_id());
        assert_eq!(child.tracestate, parent.tracestate);
        let unsampled = TraceContext::parse(&TP.replace("-01", "-00"), None).unwrap().child();
        assert!(unsampled.traceparent.ends_with("-00"), "the producer's decision stands");
        for (ratio, flags) in [(1.0, "01"), (0.0, "00")] {
            let root = TraceContext::root(ratio);
            assert!(TraceContext::parse(&root.traceparent, None).is_some(), "{root:?}");
            assert!(root.traceparent.ends_with(flags), "{ratio}: {root:?}");
        }
        let sampled = (0..2000).filter(|_| TraceContext::root(0.25).traceparent.ends_with("01"));
        assert!((350..650).contains(&sampled.count()), "about a quarter sampled");
        // No span is made without export: the stage hands on by hand.
        let none = Span::none();
        assert_eq!(hand_on(&none, None), None);
        assert_eq!(hand_on(&none, Some(&parent)).unwrap().trace_id(), parent.trace_id());
        assert!(hand_on_root(&none, None).is_some(), "a turn without a context starts a trace");
    }

    #[test]
    fn the_traces_url_follows_the_otlp_convention() {
        assert_eq!(traces_url("http://127.0.0.1:4318"), "http://127.0.0.1:4318/v1/traces");
        assert_eq!(traces_url("http://c:4318/"), "http://c:4318/v1/traces");
    }
}
