//! The integration tests, one module per area, in one test binary: the harness
//! (`tools/harness`) is compiled once and every helper it has is used somewhere.
//! Each test gets its own database and `amqp.prefix` (ARCHITECTURE "Testing").

mod as_printed;
mod backlog;
mod bad_input;
mod cancel;
mod cluster;
mod console;
mod console_browser;
mod containment;
mod examples;
mod fairness;
mod fuzz;
mod hostile_headers;
mod kubernetes;
mod liveness;
mod lock_session;
mod many_locks;
mod operator;
mod order;
mod otel;
mod outage;
mod parked;
mod past_one_machine;
mod pid1;
mod retry;
mod schemas;
mod supervision;
mod support;
mod turn_path;
