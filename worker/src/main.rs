//! The `amm-worker` binary: the dispatching global allocator (jemalloc or
//! glibc malloc, chosen from `AMM_ALLOCATOR` at the first allocation) and a
//! call into the library's command line.

#[global_allocator]
static GLOBAL: amm_worker::alloc::Dispatch = amm_worker::alloc::Dispatch;

fn main() -> std::process::ExitCode {
    amm_worker::cli::main()
}
