//! The scheduling policy of the agent's threads: the relay runs under
//! `SCHED_FIFO` so an event is relayed the moment it happens; everything
//! else (the HTTP thread) runs under the normal scheduler and can never
//! take the CPU from it. The calls are the ones a client's event reader
//! uses ([`amm_protocol::sched`]).

pub use amm_protocol::sched::{set_fifo, set_normal};
