//! A TCP proxy per daemon in front of PostgreSQL, for the `partition` fault: it can go
//! silent — nothing forwarded either way, no connection closed — as a network partition
//! looks to the daemon. The server side is closed after `SERVER_NOTICES` (what PostgreSQL's
//! keepalives, which turnd sets on its lock session, do to a vanished peer: ~11 s), so the
//! server frees the partitioned daemon's locks as it would in a real partition.

use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// When the server gives up on a silent peer: turnd's lock session sets keepalives of 5 s
/// idle + 3 × 2 s probes.
pub const SERVER_NOTICES: Duration = Duration::from_secs(11);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Open,
    /// Nothing forwarded; connections stay open (the server side closes after SERVER_NOTICES).
    Silent,
    /// Every connection closed (the partition healed: what was stuck is dropped).
    Reset,
}

pub struct PgProxy {
    pub port: u16,
    /// Where new connections go (`pg-failover` moves it to the promoted server, as a Service or
    /// a virtual IP follows a failover).
    target: std::sync::Arc<std::sync::atomic::AtomicU16>,
    state: watch::Sender<(State, u64)>,
    accept: tokio::task::JoinHandle<()>,
}

impl PgProxy {
    pub async fn start(target_port: u16) -> Result<PgProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await.context("proxy bind")?;
        let port = listener.local_addr()?.port();
        // (state, generation): a connection belongs to the generation it was accepted in; a
        // Reset ends every earlier one.
        let (state, rx) = watch::channel((State::Open, 0u64));
        let target = std::sync::Arc::new(std::sync::atomic::AtomicU16::new(target_port));
        let to = target.clone();
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let (now, generation) = *rx.borrow();
                if now == State::Silent {
                    // A new connection into the partition hangs too, until it heals.
                    let mut rx = rx.clone();
                    tokio::spawn(async move {
                        let _held = inbound;
                        let _ = rx.wait_for(|(s, g)| *g != generation || *s == State::Reset).await;
                    });
                    continue;
                }
                if now != State::Open {
                    drop(inbound);
                    continue;
                }
                let rx = rx.clone();
                let target_port = to.load(std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(("127.0.0.1", target_port)).await {
                        relay(inbound, outbound, rx, generation).await;
                    }
                });
            }
        });
        Ok(PgProxy { port, target, state, accept })
    }

    /// New connections go to `port` from now on.
    pub fn retarget(&self, port: u16) {
        self.target.store(port, std::sync::atomic::Ordering::SeqCst);
    }

    /// Stops forwarding (connections stay open).
    pub fn silence(&self) {
        self.state.send_modify(|s| s.0 = State::Silent);
    }

    /// Heals: closes every connection that was silenced, forwards new ones again.
    pub fn heal(&self) {
        self.state.send_modify(|s| {
            s.0 = State::Reset;
            s.1 += 1;
        });
        self.state.send_modify(|s| s.0 = State::Open);
    }
}

impl Drop for PgProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.state.send_modify(|s| {
            s.0 = State::Reset;
            s.1 += 1;
        });
    }
}

async fn relay(
    mut inbound: TcpStream,
    mut outbound: TcpStream,
    rx: watch::Receiver<(State, u64)>,
    generation: u64,
) {
    let (mut ci, mut cw) = inbound.split();
    {
        let (mut si, mut sw) = outbound.split();
        let up = pump(&mut ci, &mut sw, rx.clone(), generation);
        let down = pump(&mut si, &mut cw, rx.clone(), generation);
        tokio::select! {
            // Either side closed, or a Reset: everything closes.
            _ = up => return,
            _ = down => return,
            noticed = server_notices(rx.clone(), generation) => if !noticed { return },
        }
    }
    // The server noticed the silence and dropped its side; the daemon's side stays open and
    // silent until the partition heals.
    drop(outbound);
    let mut rx = rx;
    let _ = rx.wait_for(|(s, g)| *g != generation || *s == State::Reset).await;
}

/// True once the link has been silent for SERVER_NOTICES; false on a Reset.
async fn server_notices(mut rx: watch::Receiver<(State, u64)>, generation: u64) -> bool {
    loop {
        let (state, g) = *rx.borrow_and_update();
        if g != generation || state == State::Reset {
            return false;
        }
        if state == State::Silent {
            tokio::select! {
                _ = tokio::time::sleep(SERVER_NOTICES) => return true,
                r = rx.changed() => if r.is_err() { return false },
            }
        } else if rx.changed().await.is_err() {
            return false;
        }
    }
}

async fn pump<R, W>(
    from: &mut R,
    to: &mut W,
    mut rx: watch::Receiver<(State, u64)>,
    generation: u64,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // Forward only while open; a silent link holds whatever it has.
        let open = rx.wait_for(|(s, g)| *g != generation || *s != State::Silent).await;
        match open.map(|v| *v) {
            Ok((State::Open, g)) if g == generation => {}
            _ => return,
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            r = rx.changed() => {
                if r.is_err() {
                    return;
                }
                continue;
            }
        };
        let open = rx.wait_for(|(s, g)| *g != generation || *s != State::Silent).await;
        match open.map(|v| *v) {
            Ok((State::Open, g)) if g == generation => {}
            _ => return,
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
