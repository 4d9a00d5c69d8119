//! `ws-load`: a load generator and small client for Waveline's realtime socket (`/v1/ws`),
//! used by `scripts/bench.sh realtime` and by `scripts/demo.sh`.
//!
//! - `idle`: opens sockets (several per account) and holds them, so the bench can read the
//!   server's memory per idle socket;
//! - `latency`: clients split across two replicas send each other direct messages at a steady
//!   rate; each message carries its send time, and the receiver measures delivery;
//! - `listen` and `send`: one socket that prints every frame it gets (JSON lines), and one
//!   that sends a message and prints what comes back.
//!
//! Accounts come from a file of `TOKEN USERNAME` lines (access tokens, sent as
//! `Authorization: Bearer`, never in the URL).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

#[derive(Parser)]
#[command(about = "Load and clients for Waveline's realtime socket")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Open sockets and hold them; prints `{"opened", "failed"}` once all are open.
    Idle {
        /// The socket URL, e.g. ws://127.0.0.1:8080/v1/ws.
        #[arg(long)]
        url: String,
        /// `TOKEN USERNAME` lines.
        #[arg(long)]
        accounts: PathBuf,
        /// Sockets per account.
        #[arg(long, default_value_t = 10)]
        per_account: usize,
        /// How long to hold them, in seconds.
        #[arg(long, default_value_t = 30)]
        hold: u64,
    },
    /// Exchange messages across two replicas and measure delivery.
    Latency {
        /// The first replica's socket URL.
        #[arg(long)]
        a: String,
        /// The second replica's socket URL.
        #[arg(long)]
        b: String,
        #[arg(long)]
        accounts: PathBuf,
        /// Messages per second in all.
        #[arg(long, default_value_t = 100)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// One socket that prints every frame it receives for a while.
    Listen {
        #[arg(long)]
        url: String,
        #[arg(long)]
        token: String,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// Sends one direct message over a socket and prints what comes back for a while.
    Send {
        #[arg(long)]
        url: String,
        #[arg(long)]
        token: String,
        #[arg(long)]
        to: String,
        #[arg(long)]
        body: String,
        #[arg(long, default_value_t = 2)]
        seconds: u64,
    },
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(url: &str, token: &str) -> anyhow::Result<Socket> {
    let mut request = url.into_client_request()?;
    request.headers_mut().insert("authorization", format!("Bearer {token}").parse()?);
    let (socket, _) = tokio_tungstenite::connect_async(request).await?;
    Ok(socket)
}

fn accounts(path: &PathBuf) -> anyhow::Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let (token, name) = line.trim().split_once(' ')?;
            Some((token.to_owned(), name.to_owned()))
        })
        .collect())
}

/// Prints frames as JSON lines until `until`.
async fn print_frames(socket: &mut Socket, until: Instant) {
    while let Ok(Some(Ok(frame))) =
        tokio::time::timeout(until.saturating_duration_since(Instant::now()), socket.next()).await
    {
        if let Message::Text(text) = frame {
            println!("{text}");
        }
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::Idle { url, accounts: file, per_account, hold } => {
            let accounts = accounts(&file)?;
            let mut sockets = Vec::new();
            let mut failed = 0u64;
            for (token, _) in &accounts {
                for _ in 0..per_account {
                    match connect(&url, token).await {
                        Ok(socket) => sockets.push(socket),
                        Err(_) => failed += 1,
                    }
                }
            }
            println!("{}", json!({"opened": sockets.len(), "failed": failed}));
            // Hold them, answering the server's pings so none is dropped as dead.
            let until = Instant::now() + Duration::from_secs(hold);
            let held: Vec<_> = sockets
                .into_iter()
                .map(|mut socket| {
                    tokio::spawn(async move {
                        while let Ok(Some(Ok(_))) =
                            tokio::time::timeout(until.saturating_duration_since(Instant::now()), socket.next()).await
                        {
                        }
                    })
                })
                .collect();
            for task in held {
                let _ = task.await;
            }
        }
        Command::Latency { a, b, accounts: file, rate, seconds } => {
            let accounts = accounts(&file)?;
            anyhow::ensure!(accounts.len() >= 2, "at least two accounts");
            let started = Instant::now();
            let latencies = Arc::new(Mutex::new(Vec::<u64>::new()));
            let received = Arc::new(AtomicU64::new(0));
            let mut senders = Vec::new();
            for (n, (token, _)) in accounts.iter().enumerate() {
                let url = if n % 2 == 0 { &a } else { &b };
                let socket = connect(url, token).await?;
                let (sink, mut stream) = socket.split();
                senders.push(Arc::new(Mutex::new(sink)));
                let (latencies, received) = (latencies.clone(), received.clone());
                tokio::spawn(async move {
                    while let Some(Ok(frame)) = stream.next().await {
                        let Message::Text(text) = frame else { continue };
                        let Ok(value) = serde_json::from_str::<Value>(&text) else { continue };
                        if value["type"] != "message.new" {
                            continue;
                        }
                        // Only the recipient's copy counts (the sender's own devices get one too).
                        let body = value["message"]["body"].as_str().unwrap_or_default();
                        let Some(sent) = body.strip_prefix("t=").and_then(|t| t.split(' ').next()?.parse::<u64>().ok())
                        else {
                            continue;
                        };
                        let now = started.elapsed().as_micros() as u64;
                        if body.ends_with(&format!(" to={n}")) {
                            latencies.lock().await.push(now.saturating_sub(sent));
                            received.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
            let total = rate * seconds;
            let every = Duration::from_secs_f64(1.0 / rate as f64);
            let mut tick = tokio::time::interval(every);
            let mut sent = 0u64;
            for i in 0..total {
                tick.tick().await;
                let from = (i as usize * 2) % accounts.len();
                // A recipient on the other replica: odd indexes are on `b`.
                let to = (from + 1) % accounts.len();
                let body = format!("t={} to={to}", started.elapsed().as_micros());
                let frame =
                    json!({"type": "message.send", "to": accounts[to].1, "body": body, "client_id": format!("l{i}")});
                if senders[from].lock().await.send(Message::text(frame.to_string())).await.is_ok() {
                    sent += 1;
                }
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            let mut all = latencies.lock().await.clone();
            all.sort_unstable();
            println!(
                "{}",
                json!({
                    "sent": sent,
                    "delivered": received.load(Ordering::Relaxed),
                    "p50_ms": percentile(&all, 0.50) as f64 / 1000.0,
                    "p99_ms": percentile(&all, 0.99) as f64 / 1000.0,
                    "max_ms": all.last().copied().unwrap_or(0) as f64 / 1000.0,
                })
            );
        }
        Command::Listen { url, token, seconds } => {
            let mut socket = connect(&url, &token).await?;
            print_frames(&mut socket, Instant::now() + Duration::from_secs(seconds)).await;
        }
        Command::Send { url, token, to, body, seconds } => {
            let mut socket = connect(&url, &token).await?;
            let id = format!("demo-{}", std::process::id());
            let frame = json!({"type": "message.send", "to": to, "body": body, "client_id": id});
            socket.send(Message::text(frame.to_string())).await?;
            print_frames(&mut socket, Instant::now() + Duration::from_secs(seconds)).await;
        }
    }
    Ok(())
}
