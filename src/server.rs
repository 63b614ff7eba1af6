//! STUB
use crate::Config;
use std::io;
use std::net::SocketAddr;
/// stub
pub struct Server {
    addr: SocketAddr,
}
/// stub
pub struct Handle;
impl Server {
    /// stub
    pub fn bind(config: Config) -> io::Result<Server> {
        let l = std::net::TcpListener::bind(config.listen)?;
        Ok(Server {
            addr: l.local_addr()?,
        })
    }
    /// stub
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
    /// stub
    pub fn run(self) -> io::Result<()> {
        Ok(())
    }
}
