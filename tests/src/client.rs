//! Clients of the backend servers (see `backend`): each call learns which backend answered.
//! Call them inside a namespace (`Netns::run`).
use std::{
    collections::BTreeMap,
    io::{self, BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

pub const TIMEOUT: Duration = Duration::from_secs(1);

/// A TCP connection and the name of the backend that accepted it.
pub struct Connection {
    pub backend: String,
    reader: BufReader<TcpStream>,
}

impl Connection {
    pub fn open(addr: SocketAddr) -> io::Result<Self> {
        let stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        let mut reader = BufReader::new(stream);
        let mut backend = String::new();
        reader.read_line(&mut backend)?;
        Ok(Self {
            backend: backend.trim().to_owned(),
            reader,
        })
    }

    /// Sends a line and returns the echo.
    pub fn echo(&mut self, line: &str) -> io::Result<String> {
        writeln!(self.reader.get_mut(), "{line}")?;
        let mut back = String::new();
        self.reader.read_line(&mut back)?;
        Ok(back.trim().to_owned())
    }
}

/// One datagram from a fresh socket (a new flow) and the name of the backend that answered.
pub fn udp_hello(addr: SocketAddr) -> io::Result<String> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    // A connected socket only accepts datagrams from `addr`: a reply that was not
    // reverse-NATed never arrives.
    socket.connect(addr)?;
    socket.send(b"hello")?;
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// How many of `count` new TCP connections each backend accepted ("error: …" for failures).
pub fn tcp_spread(addr: SocketAddr, count: usize) -> BTreeMap<String, usize> {
    tally((0..count).map(|_| Connection::open(addr).map(|c| c.backend)))
}

/// How many of `count` new UDP flows each backend answered ("error: …" for failures).
pub fn udp_spread(addr: SocketAddr, count: usize) -> BTreeMap<String, usize> {
    tally((0..count).map(|_| udp_hello(addr)))
}

fn tally(results: impl Iterator<Item = io::Result<String>>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for result in results {
        let key = result.unwrap_or_else(|e| format!("error: {}", e.kind()));
        *counts.entry(key).or_default() += 1;
    }
    counts
}
