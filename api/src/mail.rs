//! Account mail: what it says (a verification link, "someone tried to register with your
//! address", a password-reset link) and how it leaves (SMTP through `lettre`, or the log when
//! no `smtp_url` is set, so the embedded demo works without a mail server).
//!
//! Handlers never wait for mail, and never do the account lookups that would tell, by their
//! timing, whether an address has an account: they hand a [`MailJob`] to [`Mailer::post`],
//! a bounded queue drained by one background task that looks the account up, issues the
//! single-use token and sends. `POST /v1/auth/password/forgot` answers before anyone knows
//! whether the address has an account; a slow SMTP server slows no request. When the queue is
//! full the job is dropped and logged: the client's answer is the same either way.
//!
//! A token is 256 random bits (base64url), stored only as its SHA-256, bound to its purpose
//! and to the address it was mailed to, deleted when used, and expiring
//! (`email_verify_ttl_s`, `password_reset_ttl_s`).

use std::sync::Arc;
use std::time::Duration;

use lettre::message::Mailbox;
use lettre::message::header::ContentType;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use secrecy::ExposeSecret;
use tokio::sync::mpsc;
use waveline_shared::config::Settings;
use waveline_shared::db::{DbError, PgUsers, Role, TokenPurpose};
use waveline_shared::domain::UserId;

use crate::auth::new_secret_token;

/// How many mail jobs may wait; more are dropped (and logged).
const QUEUE: usize = 1024;
/// The longest an SMTP exchange may take.
const SMTP_TIMEOUT: Duration = Duration::from_secs(15);

/// Something to mail, decided by a request and done in the background.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MailJob {
    /// A verification link for the account's current address (unless it is verified already).
    Verify { user: UserId },
    /// Someone registered with an address that already has an account: tell its owner.
    AlreadyRegistered { email: String },
    /// A password-reset link, if an account has this address.
    Reset { email: String },
}

/// One message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mail {
    pub to: String,
    pub subject: String,
    pub body: String,
    /// `verify_email`, `already_registered`, `reset_password`: for the log.
    pub kind: &'static str,
}

/// Why the mail settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum MailError {
    #[error("mail_from: {0}")]
    From(String),
    #[error("smtp_url: {0}")]
    Smtp(String),
}

/// How a message leaves.
#[async_trait::async_trait]
pub trait MailTransport: Send + Sync + std::fmt::Debug {
    /// Sends one message; the error is for the log.
    async fn send(&self, mail: &Mail) -> Result<(), String>;

    /// How messages leave (`smtp`, `log`), for the log.
    fn via(&self) -> &'static str;
}

/// SMTP, through `lettre` (rustls for `smtps://` and `tls=required`).
pub struct SmtpMail {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

impl std::fmt::Debug for SmtpMail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpMail").field("from", &self.from.to_string()).finish_non_exhaustive()
    }
}

impl SmtpMail {
    /// A transport to `url` (as `smtp_url` takes it) sending as `from`.
    pub fn new(url: &str, from: &str) -> Result<SmtpMail, MailError> {
        let from = from.parse::<Mailbox>().map_err(|err| MailError::From(err.to_string()))?;
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
            // lettre's message may quote the URL; the setting is secret.
            .map_err(|_| MailError::Smtp("not a usable SMTP URL".into()))?
            .timeout(Some(SMTP_TIMEOUT))
            .build();
        Ok(SmtpMail { transport, from })
    }
}

#[async_trait::async_trait]
impl MailTransport for SmtpMail {
    async fn send(&self, mail: &Mail) -> Result<(), String> {
        let to = mail.to.parse::<Mailbox>().map_err(|err| format!("bad recipient: {err}"))?;
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(mail.subject.as_str())
            .header(ContentType::TEXT_PLAIN)
            .body(mail.body.clone())
            .map_err(|err| err.to_string())?;
        self.transport.send(message).await.map(|_| ()).map_err(|err| err.to_string())
    }

    fn via(&self) -> &'static str {
        "smtp"
    }
}

/// No SMTP server: each message is written to the log at `info`, whole (tokens included).
#[derive(Debug, Default)]
pub struct LogMail;

#[async_trait::async_trait]
impl MailTransport for LogMail {
    async fn send(&self, mail: &Mail) -> Result<(), String> {
        tracing::info!(
            mail = mail.kind,
            to = %mail.to,
            subject = %mail.subject,
            body = %mail.body,
            "mail not sent (no smtp_url configured): written here instead"
        );
        Ok(())
    }

    fn via(&self) -> &'static str {
        "log"
    }
}

/// What the messages need to know.
#[derive(Debug, Clone)]
pub struct MailSettings {
    /// The web client's address: links go to its `/verify-email` and `/reset-password`.
    pub app_url: url::Url,
    pub verify_ttl: Duration,
    pub reset_ttl: Duration,
}

impl MailSettings {
    fn link(&self, page: &str, token: Option<&str>) -> String {
        let mut url = self.app_url.clone();
        let base = url.path().trim_end_matches('/').to_owned();
        url.set_path(&format!("{base}/{page}"));
        url.set_query(None);
        if let Some(token) = token {
            url.query_pairs_mut().append_pair("token", token);
        }
        url.to_string()
    }
}

fn duration_text(ttl: Duration) -> String {
    match ttl.as_secs() {
        secs if secs >= 7200 && secs.is_multiple_of(3600) => format!("{} hours", secs / 3600),
        secs if secs >= 120 => format!("{} minutes", secs / 60),
        secs => format!("{secs} seconds"),
    }
}

/// The verification mail.
pub fn verification(settings: &MailSettings, to: &str, username: &str, token: &str) -> Mail {
    let link = settings.link("verify-email", Some(token));
    let ttl = duration_text(settings.verify_ttl);
    Mail {
        to: to.to_owned(),
        subject: "Confirm your email address for Waveline".into(),
        body: format!(
            "Hello {username},\n\n\
             To confirm that this address belongs to your Waveline account, sign in to it and\n\
             open this link:\n\n\
             {link}\n\n\
             or give your signed-in Waveline app this code:\n\n\
             code: {token}\n\n\
             It works once, for {ttl}.\n\n\
             If you did not create a Waveline account, ignore this mail: someone else typed your\n\
             address, and it stays unconfirmed. If you want the address back, reset the\n\
             account's password with it (\"forgot password\"): that ends every session of the\n\
             account and makes it yours.\n"
        ),
        kind: "verify_email",
    }
}

/// The mail to an address someone tried to register again.
pub fn already_registered(settings: &MailSettings, to: &str) -> Mail {
    let reset = settings.link("reset-password", None);
    Mail {
        to: to.to_owned(),
        subject: "Someone tried to register with your address".into(),
        body: format!(
            "Someone (perhaps you) tried to create a Waveline account with this address.\n\
             This address already has an account, so no new account was made.\n\n\
             If it was you, log in instead. If you forgot the password, choose a new one here:\n\n\
             {reset}\n\n\
             If it was not you, ignore this mail: your account did not change.\n"
        ),
        kind: "already_registered",
    }
}

/// The password-reset mail.
pub fn password_reset(settings: &MailSettings, to: &str, username: &str, token: &str) -> Mail {
    let link = settings.link("reset-password", Some(token));
    let ttl = duration_text(settings.reset_ttl);
    Mail {
        to: to.to_owned(),
        subject: "Reset your Waveline password".into(),
        body: format!(
            "Hello {username},\n\n\
             Someone (perhaps you) asked to reset the password of the Waveline account with this\n\
             address. To choose a new password, open this link:\n\n\
             {link}\n\n\
             or give your Waveline app this code:\n\n\
             code: {token}\n\n\
             It works once, for {ttl}. A reset ends every session of the account (everyone\n\
             signed in is signed out) and confirms this address.\n\n\
             If you did not ask for it, ignore this mail: your password stays as it is.\n"
        ),
        kind: "reset_password",
    }
}

/// Posts mail jobs to the background task that does them.
#[derive(Debug, Clone)]
pub struct Mailer {
    jobs: mpsc::Sender<MailJob>,
}

impl Mailer {
    /// The mailer the settings ask for: SMTP at `smtp_url`, or the log. Starts its task (so
    /// it is called inside the runtime).
    pub fn from_settings(settings: &Settings, users: PgUsers) -> Result<Mailer, MailError> {
        let transport: Arc<dyn MailTransport> = match &settings.smtp_url {
            Some(url) => Arc::new(SmtpMail::new(url.expose_secret(), &settings.mail_from)?),
            None => {
                settings.mail_from.parse::<Mailbox>().map_err(|err| MailError::From(err.to_string()))?;
                tracing::warn!("no smtp_url configured: account mail is written to the log, not sent");
                Arc::new(LogMail)
            }
        };
        let mail = MailSettings {
            app_url: settings.app_url.clone(),
            verify_ttl: settings.email_verify_ttl,
            reset_ttl: settings.password_reset_ttl,
        };
        Ok(Mailer::start(users, transport, mail))
    }

    /// Starts the task that does the jobs, one at a time.
    pub fn start(users: PgUsers, transport: Arc<dyn MailTransport>, settings: MailSettings) -> Mailer {
        let (jobs, mut queue) = mpsc::channel(QUEUE);
        tokio::spawn(async move {
            while let Some(job) = queue.recv().await {
                match compose(&users, &settings, &job).await {
                    Ok(Some(mail)) => match transport.send(&mail).await {
                        Ok(()) => tracing::info!(mail = mail.kind, via = transport.via(), "mail done"),
                        Err(err) => {
                            tracing::warn!(mail = mail.kind, via = transport.via(), error = %err, "mail not sent")
                        }
                    },
                    Ok(None) => {}
                    Err(err) => tracing::warn!(error = %err, "mail not sent: the database failed"),
                }
            }
        });
        Mailer { jobs }
    }

    /// Queues a job; never waits. A full queue drops it (logged).
    pub fn post(&self, job: MailJob) {
        if self.jobs.try_send(job).is_err() {
            tracing::warn!("the mail queue is full: a mail was dropped");
        }
    }
}

/// The message a job makes, if any (no account, a verified address, the hourly token cap).
async fn compose(users: &PgUsers, settings: &MailSettings, job: &MailJob) -> Result<Option<Mail>, DbError> {
    match job {
        MailJob::Verify { user } => {
            let Some(user) = users.by_id(*user).await? else {
                return Ok(None);
            };
            if user.email_verified || user.role == Role::System {
                return Ok(None);
            }
            let (token, hash) = new_secret_token();
            if !users.issue_token(TokenPurpose::VerifyEmail, user.id, &user.email, &hash, settings.verify_ttl).await? {
                tracing::info!(user = %user.id, "verification mail not sent: too many this hour");
                return Ok(None);
            }
            Ok(Some(verification(settings, &user.email, &user.username, &token)))
        }
        MailJob::AlreadyRegistered { email } => Ok(Some(already_registered(settings, email))),
        MailJob::Reset { email } => {
            let Some(user) = users.by_email(email).await?.filter(|user| user.role != Role::System) else {
                return Ok(None);
            };
            let (token, hash) = new_secret_token();
            if !users.issue_token(TokenPurpose::ResetPassword, user.id, &user.email, &hash, settings.reset_ttl).await? {
                tracing::info!(user = %user.id, "reset mail not sent: too many this hour");
                return Ok(None);
            }
            Ok(Some(password_reset(settings, &user.email, &user.username, &token)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(app: &str) -> MailSettings {
        MailSettings {
            app_url: url::Url::parse(app).expect("url"),
            verify_ttl: Duration::from_secs(86_400),
            reset_ttl: Duration::from_secs(3600),
        }
    }

    #[test]
    fn links_go_to_the_web_client_with_the_token() {
        let mail = verification(&settings("https://app.example.com/base/"), "a@b.co", "ann", "tok-EN_1");
        assert!(mail.body.contains("https://app.example.com/base/verify-email?token=tok-EN_1\n"), "{}", mail.body);
        assert!(mail.body.contains("code: tok-EN_1\n") && mail.body.contains("24 hours"), "{}", mail.body);
        let mail = password_reset(&settings("http://127.0.0.1:8080"), "a@b.co", "ann", "t");
        assert!(mail.body.contains("http://127.0.0.1:8080/reset-password?token=t\n"), "{}", mail.body);
        assert!(mail.body.contains("60 minutes"), "{}", mail.body);
        let mail = already_registered(&settings("https://app.example.com"), "a@b.co");
        assert!(mail.body.contains("https://app.example.com/reset-password\n") && !mail.body.contains("token"));
    }

    #[test]
    fn bad_senders_and_urls_are_refused_without_echoing_secrets() {
        assert!(matches!(SmtpMail::new("smtp://127.0.0.1:25", "not an address"), Err(MailError::From(_))));
        let err = SmtpMail::new("smtp://u:hunter2@[bad", "a@b.co").expect_err("bad URL");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }
}
