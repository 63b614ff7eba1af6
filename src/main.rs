//! The `closewait` binary: a thin layer over [`closewait::demo::run`].

fn main() -> std::process::ExitCode {
    closewait::demo::run(std::env::args_os())
}
