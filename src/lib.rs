//! closewait: a mio TCP server that holds persistent connections for months without leaking
//! a single file descriptor.
#![deny(missing_docs)]

pub mod cli;
pub mod config;
pub mod procfs;
mod server;

pub use config::{Config, EofPolicy, WhenFull};
pub use server::{Handle, Server};
