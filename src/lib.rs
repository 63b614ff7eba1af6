//! closewait: a mio TCP server that holds persistent connections for months without leaking
//! a single file descriptor.
#![deny(missing_docs)]

pub mod cli;
pub mod config;
pub mod connection;
mod connections;
pub mod frame;
mod leak;
pub mod limits;
mod listener;
pub mod procfs;
mod server;
pub mod service;
pub mod stats;
pub mod throttle;
pub mod timers;

pub use config::{Config, EofPolicy, WhenFull};
pub use server::{Handle, Server};
pub use service::{Context, Reply, Service};
