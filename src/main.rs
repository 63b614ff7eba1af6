//! The `closewait` binary: a thin layer over [`closewait::cli::run`].

fn main() -> std::process::ExitCode {
    closewait::cli::run(std::env::args_os())
}
