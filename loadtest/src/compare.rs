//! TODO
/// Flags of this subcommand.
#[derive(clap::Args, Debug)]
pub struct Args {}
/// Run it.
pub fn run(_args: Args) -> std::process::ExitCode {
    std::process::ExitCode::FAILURE
}
