//! `loadtest baseline-server`: the wire protocol served the idiomatic tokio way, as the
//! benchmark's baseline.
//!
//! One current-thread runtime (closewait's default is one event-loop thread too), one task per
//! connection, `BufReader`/`BufWriter` over the two halves of `into_split()`, `read_u32` then
//! `read_exact` for each frame, and a flush only when the reader has nothing buffered (so
//! pipelined requests share one write). This is what a competent tokio server looks like
//! without tuning; it is not a straw man and not a tuned competitor either.

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use closewait::service::{ECHO, ECHO_REPLY, ERROR, PING, PING_REPLY, STATS, STATS_REPLY};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};

/// Flags of `loadtest baseline-server`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Address to listen on (port 0 = let the OS pick; the chosen one is printed).
    #[arg(long, default_value = "127.0.0.1:7879", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Largest frame body a peer may send, in bytes.
    #[arg(long, default_value_t = closewait::config::DEFAULT_MAX_FRAME as u32, value_name = "BYTES",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_frame: u32,
}

/// Counters reported by STATS (`tokio::spawn` wants `Send`, hence atomics on one thread).
#[derive(Default)]
struct Counters {
    active: AtomicU64,
    accepted: AtomicU64,
    requests: AtomicU64,
}

/// Run the baseline server until the process is killed (SIGTERM's default action exits).
pub fn run(args: Args) -> ExitCode {
    // Hold as many connections as the hard limit allows (the benchmark opens 10,000).
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("baseline-server: cannot raise RLIMIT_NOFILE: {e}");
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("baseline-server: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("baseline-server: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: Args) -> std::io::Result<()> {
    let listener = TcpListener::bind(args.listen).await?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening on {}", listener.local_addr()?)?;
    out.flush()?;
    drop(out);
    let counters = Arc::new(Counters::default());
    loop {
        let (stream, _peer) = match listener.accept().await {
            Ok(pair) => pair,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                eprintln!("baseline-server: accept: {e}");
                tokio::task::yield_now().await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        counters.accepted.fetch_add(1, Relaxed);
        counters.active.fetch_add(1, Relaxed);
        let counters = Arc::clone(&counters);
        let max_frame = args.max_frame;
        tokio::spawn(async move {
            // Errors (resets) just end the connection, as in most tokio servers.
            let _ = connection(stream, max_frame, &counters).await;
            counters.active.fetch_sub(1, Relaxed);
        });
    }
}

async fn connection(stream: TcpStream, max_frame: u32, counters: &Counters) -> std::io::Result<()> {
    let (read, write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut writer = BufWriter::new(write);
    let mut body = Vec::new();
    loop {
        let len = match reader.read_u32().await {
            Ok(len) => len,
            // The peer's FIN between frames: a normal close.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        if len == 0 || len > max_frame {
            send(
                &mut writer,
                ERROR,
                format!("bad frame length {len}").as_bytes(),
            )
            .await?;
            writer.flush().await?;
            return Ok(());
        }
        body.resize(len as usize, 0);
        reader.read_exact(&mut body).await?;
        counters.requests.fetch_add(1, Relaxed);
        match body[0] {
            ECHO => send(&mut writer, ECHO_REPLY, &body[1..]).await?,
            PING => send(&mut writer, PING_REPLY, &[]).await?,
            STATS => {
                let text = format!(
                    "active {}\naccepted {}\nrequests {}\n",
                    counters.active.load(Relaxed),
                    counters.accepted.load(Relaxed),
                    counters.requests.load(Relaxed)
                );
                send(&mut writer, STATS_REPLY, text.as_bytes()).await?;
            }
            op => {
                send(
                    &mut writer,
                    ERROR,
                    format!("unknown op {op:#04x}").as_bytes(),
                )
                .await?
            }
        }
        if reader.buffer().is_empty() {
            writer.flush().await?;
        }
    }
}

async fn send<W: AsyncWriteExt + Unpin>(
    writer: &mut W,
    op: u8,
    data: &[u8],
) -> std::io::Result<()> {
    writer.write_u32(data.len() as u32 + 1).await?;
    writer.write_u8(op).await?;
    writer.write_all(data).await
}
