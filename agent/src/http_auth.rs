//! Who may read the HTTP listener.
//!
//! The page and `/metrics` show every watched process of every user, as
//! `amm-agent status` shows root; on the socket a user sees only its own
//! watches. So by default the listener serves only requests that carry the
//! agent's bearer token: a random 256-bit token made at each start and
//! written to a file only root (and a group the operator names,
//! `--http-group`) can read. Prometheus reads it with
//! `authorization: { credentials_file: FILE }`; `curl` with
//! `-H "Authorization: Bearer $(cat FILE)"`; a browser opens
//! `http://127.0.0.1:PORT/?token=TOKEN` once, is redirected to the same page
//! without the token in its address and keeps it in a cookie (HttpOnly,
//! SameSite=Strict, for the browser session). `--http-public` switches the
//! check off for a single-user machine. Tokens are compared in constant
//! time ([`subtle`]).

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use http::header::{AUTHORIZATION, COOKIE};
use http::{HeaderMap, Uri};
use nix::fcntl::OFlag;
use subtle::ConstantTimeEq;

/// Bytes of randomness in a token (written as twice as many hex digits).
pub const TOKEN_BYTES: usize = 32;
/// Mode of the token file: the agent's user reads and writes it, its group
/// reads it.
pub const TOKEN_FILE_MODE: u32 = 0o640;
/// The query parameter a browser brings the token in once.
pub const QUERY_PARAM: &str = "token";

/// A bearer token. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(…)")
    }
}

impl Token {
    /// A fresh token from the kernel's random source.
    pub fn generate() -> Result<Token> {
        let mut raw = [0u8; TOKEN_BYTES];
        getrandom::fill(&mut raw)
            .map_err(|e| anyhow::anyhow!("cannot read random bytes for the HTTP token: {e}"))?;
        Ok(Token(raw.iter().map(|b| format!("{b:02x}")).collect()))
    }

    /// The token as it is written and sent.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `offered` is this token, in time that depends only on the
    /// lengths (which are public: every token has the same).
    pub fn matches(&self, offered: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), offered.as_bytes());
        a.len() == b.len() && bool::from(a.ct_eq(b))
    }
}

/// How the listener admits requests.
#[derive(Debug, Clone)]
pub enum Access {
    /// Only requests carrying this token; the file it was written to (named
    /// in refusals).
    Token {
        /// The token.
        token: Token,
        /// Where it was written.
        file: PathBuf,
    },
    /// Everyone who can reach the listener (`--http-public`).
    Public,
}

/// What the listener does with a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Serve it.
    Allowed,
    /// The right token came in the URL: set the cookie and send the browser
    /// to `location` (the same path, without the token).
    Login {
        /// Where to go.
        location: String,
        /// The `Set-Cookie` value.
        cookie: String,
    },
    /// Refuse it (401), saying why.
    Refused(&'static str),
}

/// The cookie's name: one per port, so two agents on one machine (or an
/// agent restarted on another port) do not overwrite each other's.
pub fn cookie_name(port: u16) -> String {
    format!("amm_token_{port}")
}

/// The `Set-Cookie` value that keeps `token` for the browser session.
fn set_cookie(port: u16, token: &Token) -> String {
    format!(
        "{}={}; Path=/; HttpOnly; SameSite=Strict",
        cookie_name(port),
        token.as_str()
    )
}

/// The bearer credential of an `Authorization` header, if it is one.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = v.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

/// Every value of cookie `name` the request carries.
fn cookies<'a>(headers: &'a HeaderMap, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(move |kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name).then_some(v.trim())
        })
}

/// The token a URL's query brings, if any.
fn query_token(uri: &Uri) -> Option<&str> {
    uri.query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == QUERY_PARAM).then_some(v)
    })
}

/// Decides on one request to the listener on `port`.
pub fn check(access: &Access, port: u16, headers: &HeaderMap, uri: &Uri) -> Verdict {
    let Access::Token { token, .. } = access else {
        return Verdict::Allowed;
    };
    if let Some(offered) = query_token(uri) {
        if !token.matches(offered) {
            return Verdict::Refused("the token in the URL is not this agent's");
        }
        // only a path of this listener: never `//host/`, which a browser
        // would take for another site
        let path = uri.path();
        let local = path.starts_with('/') && !path.starts_with("//");
        return Verdict::Login {
            location: if local { path } else { "/" }.to_string(),
            cookie: set_cookie(port, token),
        };
    }
    if let Some(offered) = bearer(headers) {
        return if token.matches(offered) {
            Verdict::Allowed
        } else {
            Verdict::Refused("the bearer token is not this agent's")
        };
    }
    if headers.contains_key(AUTHORIZATION) {
        return Verdict::Refused("only a bearer token is accepted");
    }
    let name = cookie_name(port);
    let mut offered = cookies(headers, &name).peekable();
    if offered.peek().is_none() {
        return Verdict::Refused("the request carries no token");
    }
    if offered.any(|c| token.matches(c)) {
        Verdict::Allowed
    } else {
        Verdict::Refused("the token in the cookie is not this agent's (did it restart?)")
    }
}

/// The default token file: beside the socket, `agent.sock` →
/// `agent.http-token`.
pub fn default_file(socket: &Path) -> PathBuf {
    socket.with_extension("http-token")
}

/// Writes `token` to `path`, mode [`TOKEN_FILE_MODE`], owned by the agent's
/// user and `gid` (the agent's group when `None`), replacing whatever was
/// there without following it: the token goes to a new file created
/// beside it (`O_EXCL | O_NOFOLLOW`, 0600 until its owner and mode are
/// set), which is then renamed over `path`.
pub fn write_file(path: &Path, token: &Token, gid: Option<u32>) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{} names no file for the HTTP token", path.display()))?;
    let suffix = &Token::generate()?.0[..16];
    let tmp = dir.join(format!(".{}.{suffix}", name.to_string_lossy()));
    let written = (|| -> Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC).bits())
            .open(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        std::os::unix::fs::fchown(&f, None, gid)
            .with_context(|| format!("cannot give {} to group {gid:?}", tmp.display()))?;
        f.set_permissions(std::fs::Permissions::from_mode(TOKEN_FILE_MODE))?;
        f.write_all(token.as_str().as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot move the token into {}", path.display()))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.with_context(|| {
        format!(
            "cannot write the HTTP token to {} (its directory must exist and be the agent's to \
             write; or give --http-token-file elsewhere)",
            path.display()
        )
    })
}

/// Removes the token file at `path` if it is still a regular file of the
/// agent's user holding `token` (another agent may have taken the path).
/// It is opened without following a link or blocking on a FIFO and checked
/// through that descriptor, so nothing planted there is read or waited on.
pub fn remove_file(path: &Path, token: &Token) {
    let Ok(f) = OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).bits())
        .open(path)
    else {
        return;
    };
    let Ok(meta) = f.metadata() else { return };
    if !meta.file_type().is_file() || meta.uid() != nix::unistd::geteuid().as_raw() {
        return;
    }
    let mut held = Vec::with_capacity(2 * TOKEN_BYTES);
    if (&f)
        .take(4 * TOKEN_BYTES as u64)
        .read_to_end(&mut held)
        .is_ok()
        && token.matches(&String::from_utf8_lossy(&held))
    {
        let _ = std::fs::remove_file(path);
    }
}

/// Removes the token file when dropped: held by `amm-agent run` for as long
/// as it serves, so a stopped agent leaves no token behind.
#[derive(Debug)]
pub struct RemoveOnDrop {
    file: PathBuf,
    token: Token,
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        remove_file(&self.file, &self.token);
    }
}

impl Access {
    /// A fresh token to be written to `file`.
    pub fn with_token(file: PathBuf) -> Result<Access> {
        check_path(&file)?;
        Ok(Access::Token {
            token: Token::generate()?,
            file,
        })
    }

    /// What removes the token file at shutdown (nothing when public).
    pub fn remover(&self) -> Option<RemoveOnDrop> {
        match self {
            Access::Token { token, file } => Some(RemoveOnDrop {
                file: file.clone(),
                token: token.clone(),
            }),
            Access::Public => None,
        }
    }

    /// Writes the token file (mode [`TOKEN_FILE_MODE`], group `gid`); a
    /// public listener has none.
    pub fn publish(&self, gid: Option<u32>) -> Result<()> {
        match self {
            Access::Token { token, file } => write_file(file, token, gid),
            Access::Public => Ok(()),
        }
    }
}

/// The one-line body of a 401: why, and how to get in.
pub fn refusal(access: &Access, why: &str) -> String {
    match access {
        Access::Token { file, .. } => format!(
            "{why}: the token is in {f} (readable by root and --http-group); send \
             `Authorization: Bearer $(cat {f})`, or open /?token=$(cat {f}) once in a browser",
            f = file.display()
        ),
        Access::Public => why.to_string(),
    }
}

/// Refuses a token file path the agent cannot use.
pub fn check_path(path: &Path) -> Result<()> {
    if path.file_name().is_none() {
        bail!(
            "--http-token-file {} names no file; give a path such as /run/amm/agent.http-token",
            path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn token_access() -> (Access, Token) {
        let token = Token::generate().expect("token");
        (
            Access::Token {
                token: token.clone(),
                file: PathBuf::from("/run/amm/agent.http-token"),
            },
            token,
        )
    }

    fn headers(pairs: &[(http::header::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(k.clone(), HeaderValue::from_str(v).expect("value"));
        }
        h
    }

    #[test]
    fn tokens_are_random_hex_and_compare_exactly() {
        let a = Token::generate().expect("a");
        let b = Token::generate().expect("b");
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 2 * TOKEN_BYTES);
        assert!(a.as_str().bytes().all(|c| c.is_ascii_hexdigit()));
        assert!(a.matches(a.as_str()));
        assert!(!a.matches(b.as_str()));
        assert!(!a.matches(&a.as_str()[1..]));
        assert!(!a.matches(""));
        assert!(!format!("{a:?}").contains(a.as_str()));
    }

    #[test]
    fn each_credential_is_checked_and_each_refusal_says_why() {
        let (access, token) = token_access();
        let root: Uri = "/metrics".parse().expect("uri");
        let t = token.as_str();
        let ok = |h: &HeaderMap| check(&access, 9464, h, &root);
        assert_eq!(
            ok(&HeaderMap::new()),
            Verdict::Refused("the request carries no token")
        );
        assert_eq!(
            ok(&headers(&[(AUTHORIZATION, &format!("Bearer {t}"))])),
            Verdict::Allowed
        );
        assert_eq!(
            ok(&headers(&[(AUTHORIZATION, &format!("bearer  {t} "))])),
            Verdict::Allowed
        );
        assert!(matches!(
            ok(&headers(&[(AUTHORIZATION, "Bearer nope")])),
            Verdict::Refused(_)
        ));
        assert_eq!(
            ok(&headers(&[(AUTHORIZATION, &format!("Basic {t}"))])),
            Verdict::Refused("only a bearer token is accepted")
        );
        // the cookie of this port only, among others
        let good = format!("a=b; amm_token_9464={t}; c=d");
        assert_eq!(ok(&headers(&[(COOKIE, &good)])), Verdict::Allowed);
        let other_port = format!("amm_token_9465={t}");
        assert!(matches!(
            ok(&headers(&[(COOKIE, &other_port)])),
            Verdict::Refused(_)
        ));
        assert!(matches!(
            ok(&headers(&[(COOKIE, "amm_token_9464=stale")])),
            Verdict::Refused(_)
        ));
        // a stale cookie beside the right one does not lock the user out
        let both = headers(&[
            (COOKIE, "amm_token_9464=stale"),
            (COOKIE, &format!("amm_token_9464={t}")),
        ]);
        assert_eq!(ok(&both), Verdict::Allowed);
        // public: no check at all
        assert_eq!(
            check(&Access::Public, 9464, &HeaderMap::new(), &root),
            Verdict::Allowed
        );
    }

    #[test]
    fn the_token_in_a_url_logs_in_once_and_leaves_the_address() {
        let (access, token) = token_access();
        let uri: Uri = format!("/report/42?token={}", token.as_str())
            .parse()
            .expect("uri");
        match check(&access, 8080, &HeaderMap::new(), &uri) {
            Verdict::Login { location, cookie } => {
                assert_eq!(location, "/report/42");
                assert_eq!(
                    cookie,
                    format!(
                        "amm_token_8080={}; Path=/; HttpOnly; SameSite=Strict",
                        token.as_str()
                    )
                );
            }
            v => panic!("{v:?}"),
        }
        let elsewhere: Uri = format!("//evil.example/x?token={}", token.as_str())
            .parse()
            .expect("uri");
        match check(&access, 8080, &HeaderMap::new(), &elsewhere) {
            Verdict::Login { location, .. } => assert_eq!(location, "/"),
            v => panic!("{v:?}"),
        }
        let wrong: Uri = "/?token=guess".parse().expect("uri");
        assert_eq!(
            check(&access, 8080, &HeaderMap::new(), &wrong),
            Verdict::Refused("the token in the URL is not this agent's")
        );
    }

    #[test]
    fn the_file_replaces_what_was_planted_without_following_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").expect("write");
        let path = dir.path().join("agent.http-token");
        std::os::unix::fs::symlink(&victim, &path).expect("plant a link");
        let token = Token::generate().expect("token");
        write_file(&path, &token, None).expect("write");
        assert_eq!(std::fs::read(&victim).expect("victim"), b"precious");
        let meta = std::fs::symlink_metadata(&path).expect("meta");
        assert!(meta.file_type().is_file());
        assert_eq!(meta.mode() & 0o777, TOKEN_FILE_MODE);
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            token.as_str()
        );
        // nothing else left behind
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 2);
        // removed only while it still holds this token
        let other = Token::generate().expect("other");
        remove_file(&path, &other);
        assert!(path.exists());
        remove_file(&path, &token);
        assert!(!path.exists());
        assert_eq!(
            default_file(Path::new("/run/amm/agent.sock")),
            Path::new("/run/amm/agent.http-token")
        );
    }

    #[test]
    fn removal_waits_on_nothing_planted_and_refusals_name_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let token = Token::generate().expect("token");
        // a FIFO at the path: not opened for reading in a way that blocks
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("mkfifo");
        remove_file(&fifo, &token);
        assert!(fifo.exists(), "a FIFO is not the token file");
        // a link to a file holding the token: neither followed nor removed
        let target = dir.path().join("target");
        std::fs::write(&target, token.as_str()).expect("write");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).expect("link");
        remove_file(&link, &token);
        assert!(link.exists() && target.exists());
        // the guard removes what was published
        let file = dir.path().join("agent.http-token");
        let access = Access::with_token(file.clone()).expect("access");
        access.publish(None).expect("publish");
        assert!(file.exists());
        let why = refusal(&access, "the request carries no token");
        assert!(why.contains(&file.display().to_string()), "{why}");
        assert!(!why.contains('\n'), "{why}");
        drop(access.remover());
        assert!(!file.exists());
        assert!(Access::Public.remover().is_none());
        assert!(Access::with_token(PathBuf::from("/")).is_err());
    }
}
