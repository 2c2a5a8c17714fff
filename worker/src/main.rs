//! The `amm-worker` binary: the dispatching global allocator and a call
//! into the library's command line.

#[global_allocator]
static GLOBAL: amm_worker::alloc::Dispatch = amm_worker::alloc::Dispatch;

fn main() {}
