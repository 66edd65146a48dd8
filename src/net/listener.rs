//! Downstream listeners: one SO_REUSEPORT socket per worker per address,
//! so the kernel spreads connections over cores without a shared queue.
//!
//! Owns: socket options and binding. Does not own: accepting (the worker).

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// Bind `count` sockets to `addr` with SO_REUSEPORT. When `addr` has port
/// 0 the first bind picks the port and the others share it.
pub fn bind_reuseport(
    addr: SocketAddr,
    backlog: i32,
    count: usize,
) -> io::Result<Vec<std::net::TcpListener>> {
    let mut out = Vec::with_capacity(count);
    let mut bind_addr = addr;
    for _ in 0..count {
        let socket = Socket::new(
            Domain::for_address(bind_addr),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&bind_addr.into())?;
        socket.listen(backlog)?;
        let listener: std::net::TcpListener = socket.into();
        bind_addr = listener.local_addr()?;
        out.push(listener);
    }
    Ok(out)
}
