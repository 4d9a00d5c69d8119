//! A small SMTP server on loopback that keeps every message it receives, for the account-mail
//! tests: Waveline sends through its real mail path (lettre over SMTP) and the test reads what
//! arrived. It speaks just enough SMTP for a client that needs no TLS or authentication:
//! `EHLO`/`HELO`, `MAIL`, `RCPT`, `DATA` (with dot-unstuffing), `RSET`, `NOOP`, `QUIT`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// The longest line or message the sink takes (a client sending more is cut off).
const MAX_MESSAGE: usize = 1 << 20;

/// One message as delivered.
#[derive(Debug, Clone)]
pub struct Received {
    /// The envelope's recipients, as given in `RCPT TO`.
    pub to: Vec<String>,
    pub subject: String,
    /// The body, decoded from its transfer encoding.
    pub body: String,
}

impl Received {
    /// The token of the mail: the value of its `code: …` line.
    pub fn code(&self) -> Result<String> {
        self.body
            .lines()
            .find_map(|line| line.trim().strip_prefix("code: "))
            .map(str::to_owned)
            .with_context(|| format!("no code in the mail: {}", self.body))
    }
}

type Inbox = Arc<Mutex<Vec<Received>>>;

/// The running sink; it stops when dropped.
#[derive(Debug)]
pub struct SmtpSink {
    pub port: u16,
    inbox: Inbox,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock(inbox: &Inbox) -> std::sync::MutexGuard<'_, Vec<Received>> {
    inbox.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl SmtpSink {
    /// Listens on a free loopback port (the listener is bound before the port is handed out).
    pub async fn start() -> Result<SmtpSink> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let inbox: Inbox = Arc::default();
        let kept = inbox.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let inbox = kept.clone();
                tokio::spawn(async move {
                    let _ = converse(stream, inbox).await;
                });
            }
        });
        Ok(SmtpSink { port, inbox, task })
    }

    /// The `smtp_url` that delivers here.
    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    /// Every message received so far for `address`.
    pub fn to(&self, address: &str) -> Vec<Received> {
        lock(&self.inbox)
            .iter()
            .filter(|mail| mail.to.iter().any(|to| to.eq_ignore_ascii_case(address)))
            .cloned()
            .collect()
    }

    /// Waits (at most 20 s) until `address` has received `count` messages; returns the last.
    pub async fn wait_for(&self, address: &str, count: usize) -> Result<Received> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mails = self.to(address);
            if mails.len() >= count {
                return mails.into_iter().nth(count - 1).context("a mail");
            }
            if Instant::now() > deadline {
                bail!("{address} received {} mails, not {count}, within 20 s", mails.len());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn converse(stream: TcpStream, inbox: Inbox) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    write.write_all(b"220 waveline-test-sink ESMTP\r\n").await?;
    let mut to = Vec::new();
    loop {
        let line = read_line(&mut lines).await?;
        let verb = line.split_whitespace().next().unwrap_or_default().to_ascii_uppercase();
        let reply: &[u8] = match verb.as_str() {
            "EHLO" | "HELO" => b"250 waveline-test-sink\r\n",
            "MAIL" => {
                to.clear();
                b"250 OK\r\n"
            }
            "RCPT" => {
                let address = line.split_once(':').map(|(_, rest)| rest.trim()).unwrap_or_default();
                to.push(address.trim_start_matches('<').trim_end_matches('>').to_owned());
                b"250 OK\r\n"
            }
            "DATA" => {
                write.write_all(b"354 end with <CRLF>.<CRLF>\r\n").await?;
                let mut data = String::new();
                loop {
                    let line = read_line(&mut lines).await?;
                    if line == "." {
                        break;
                    }
                    data.push_str(line.strip_prefix('.').unwrap_or(&line));
                    data.push_str("\r\n");
                    if data.len() > MAX_MESSAGE {
                        bail!("message too large");
                    }
                }
                lock(&inbox).push(parse(std::mem::take(&mut to), &data));
                b"250 OK: kept\r\n"
            }
            "RSET" => {
                to.clear();
                b"250 OK\r\n"
            }
            "NOOP" => b"250 OK\r\n",
            "QUIT" => {
                write.write_all(b"221 bye\r\n").await?;
                return Ok(());
            }
            _ => b"502 not implemented\r\n",
        };
        write.write_all(reply).await?;
    }
}

/// One line without its CRLF; fails at the end of the stream or past the size limit.
async fn read_line(lines: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> Result<String> {
    let mut buf = Vec::new();
    let read = (&mut *lines).take(MAX_MESSAGE as u64).read_until(b'\n', &mut buf).await?;
    if read == 0 {
        bail!("the client closed the connection");
    }
    let text = String::from_utf8_lossy(&buf);
    Ok(text.trim_end_matches(['\r', '\n']).to_owned())
}

/// Headers (unfolded) and the body, decoded from quoted-printable when it is so encoded.
fn parse(to: Vec<String>, data: &str) -> Received {
    let (head, body) = data.split_once("\r\n\r\n").unwrap_or((data, ""));
    let unfolded = head.replace("\r\n ", " ").replace("\r\n\t", " ");
    let header = |name: &str| {
        unfolded.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim().eq_ignore_ascii_case(name).then(|| value.trim().to_owned())
        })
    };
    let subject = header("subject").unwrap_or_default();
    let body = match header("content-transfer-encoding") {
        Some(encoding) if encoding.eq_ignore_ascii_case("quoted-printable") => decode_quoted_printable(body),
        _ => body.to_owned(),
    };
    Received { to, subject, body: body.replace("\r\n", "\n") }
}

fn decode_quoted_printable(text: &str) -> String {
    let joined = text.replace("=\r\n", "");
    let bytes = joined.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'='
            && let Some(byte) = joined.get(i + 1..i + 3).and_then(|hex| u8::from_str_radix(hex, 16).ok())
        {
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_printable_bodies_are_decoded() {
        let mail = parse(
            vec!["a@b.co".into()],
            "Subject: Hi\r\n there\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nhttp://x/v?token=3DAB=\r\nCD\r\ncode: =\r\nAB\r\n",
        );
        assert_eq!(mail.subject, "Hi there");
        assert_eq!(mail.body, "http://x/v?token=ABCD\ncode: AB\n");
        assert_eq!(mail.code().expect("code"), "AB");
    }
}
