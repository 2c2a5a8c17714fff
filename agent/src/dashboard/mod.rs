//! The live page's assets, compiled into the agent (no CDN, no build step):
//! one HTML page, its script and its styles. The script opens `/events`
//! (server-sent events) and redraws the rows, bars, sparklines and the
//! event feed from each frame ([`crate::live::Frame`]).

/// `/`.
pub const INDEX_HTML: &str = include_str!("index.html");
/// `/app.js`.
pub const APP_JS: &str = include_str!("app.js");
/// `/app.css`.
pub const APP_CSS: &str = include_str!("app.css");
