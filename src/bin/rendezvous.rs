//! `rendezvous`: the messenger's self-hosted server. A thin main; the work is
//! in `messenger-rendezvous`.

use std::process::ExitCode;

/// mimalloc rather than glibc's malloc: the relay path allocates and frees
/// small buffers per frame from one runtime thread, and a profile put glibc
/// malloc/free at ~16 % of the server's CPU. With mimalloc the relay bench
/// moved ~25 % more messages per server CPU-second, at ~3 KB more RSS per
/// idle connection (docs/benchmarks.md, "Allocator"). The benches set the
/// same allocator so that they measure what ships.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    messenger_rendezvous::cli::main()
}
