//! amm-agent: the node's only privileged process.
//!
//! It loads amm's BPF program, attaches it to the kernel's RSS and
//! process-exit tracepoints, accepts worker registrations on a Unix socket,
//! and forwards each kernel memory event to the client that registered the
//! process.
//!
//! What it must never do: act on (signal, or configure the kernel to signal)
//! a process that was not registered by itself or by its direct parent, as
//! proven by `SO_PEERCRED`/`SO_PEERPIDFD` and held by a pidfd; or let one
//! client's bad input harm another client.

pub mod cli;
pub mod clock;
pub mod dashboard;
pub mod http;
pub mod http_auth;
pub mod identity;
pub mod kernel_report;
pub mod live;
pub mod metrics;
pub mod observe;
pub mod outbox;
pub mod probe;
pub mod realtime;
pub mod report_page;
pub mod server;
pub mod watch;
