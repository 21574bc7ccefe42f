//! `rendezvous`: the messenger's self-hosted server. A thin main; the work is
//! in `messenger-rendezvous`.

use std::process::ExitCode;

fn main() -> ExitCode {
    messenger_rendezvous::cli::main()
}
