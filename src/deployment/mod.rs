//! Deployments this daemon owns: one task per deployment holding its cross-pod lock, its
//! worker and its thread-queue consumer, and the registry that maps names to those tasks.
//!
//! ```text
//! daemon ──(has many)──► deployment task ──(owns 0..1)──► worker process (own group)
//!                            │ holds: advisory lock (epoch), thread-queue consumer
//!                            │ runs:  claim → write turn → reply/error → commit → next
//!                            └ ends:  worker exited, then registry removal, then unlock
//! ```
//!
//! **Architecture invariant**: a deployment task spawns a worker only while it holds the
//! deployment's lock, and releases the lock only after the worker has exited (or never, when
//! the lock session was lost — the server already freed it). Idle reaping, eviction at
//! `worker.max_workers`, fair admission across organizations (`admission`), crash handling
//! and graceful stop all live here.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::Broker;
use crate::config::Config;
use crate::event::{Envelope, Outcome};
use crate::lock::{Held, LockSession};
use crate::relay::RelayHandle;
use crate::store::{Claimed, Store};

use crate::turn::{DeploymentName, Epoch, ErrorCode, Seq};
use crate::worker::protocol::turn_line;
use crate::worker::{Identity, Spawner, Worker, WorkerEvent, WorkerLine, WorkerSpec};
use bells::{Bells, Closing, Slot};

/// What every deployment task shares.
#[derive(Debug)]
pub struct Ctx {
    pub config: Arc<Config>,
    pub store: Store,
    pub locks: LockSession,
    pub broker: Broker,
    pub spawner: Spawner,
    pub relay: RelayHandle,
    pub spec: WorkerSpec,
    pub daemon_id: String,
    /// Cancelled on SIGTERM: finish running turns, claim no more.
    pub drain: CancellationToken,
    /// Cancelled when the grace is over (or on a second signal): stop now.
    pub hard: CancellationToken,
}

mod admission;
mod bells;
mod owner;
mod registry;
mod serve;

pub use owner::stored_deadline;
pub use registry::Deployments;
