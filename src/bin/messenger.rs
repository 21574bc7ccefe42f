//! The `messenger` command. Everything is in `messenger-cli`.

fn main() -> std::process::ExitCode {
    messenger_cli::main()
}
