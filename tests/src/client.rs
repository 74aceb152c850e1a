//! Clients of the backend servers (see `backend`): each call learns which backend answered and
//! which client address it saw. Call them inside a namespace (`Netns::run`). And requests from
//! inside a pod, made by its own busybox (`wget_loop`).
use std::{
    collections::BTreeMap,
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

pub const TIMEOUT: Duration = Duration::from_secs(1);

/// Who answered: the backend's name and the client address it saw.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Answer {
    pub backend: String,
    pub seen: String,
}

impl Answer {
    fn parse(line: &str) -> Self {
        let mut words = line.split_whitespace();
        let backend = words.next().unwrap_or_default().to_owned();
        Self {
            backend,
            seen: words.next().unwrap_or_default().to_owned(),
        }
    }
}

/// A TCP connection and who accepted it.
pub struct Connection {
    pub answer: Answer,
    reader: BufReader<TcpStream>,
}

impl Connection {
    pub fn open(addr: SocketAddr) -> io::Result<Self> {
        let stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
        Self::greeted(stream)
    }

    /// Connects from `source` (an address of this namespace).
    pub fn open_from(source: Ipv4Addr, addr: SocketAddr) -> io::Result<Self> {
        let socket = nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Inet,
            nix::sys::socket::SockType::Stream,
            nix::sys::socket::SockFlag::empty(),
            None,
        )?;
        nix::sys::socket::bind(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            &nix::sys::socket::SockaddrIn::from(std::net::SocketAddrV4::new(source, 0)),
        )?;
        let stream = TcpStream::from(socket);
        stream.set_write_timeout(Some(TIMEOUT))?;
        connect_with_timeout(&stream, addr)?;
        Self::greeted(stream)
    }

    fn greeted(stream: TcpStream) -> io::Result<Self> {
        stream.set_read_timeout(Some(TIMEOUT))?;
        // Request/response: no Nagle waiting on a delayed ACK.
        stream.set_nodelay(true)?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        Ok(Self {
            answer: Answer::parse(&line),
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

/// A blocking connect bounded by TIMEOUT, on a socket that is already bound.
fn connect_with_timeout(stream: &TcpStream, addr: SocketAddr) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let SocketAddr::V4(v4) = addr else {
        return Err(io::ErrorKind::Unsupported.into());
    };
    let tv = nix::sys::time::TimeVal::new(TIMEOUT.as_secs() as i64, 0);
    nix::sys::socket::setsockopt(stream, nix::sys::socket::sockopt::SendTimeout, &tv)?;
    nix::sys::socket::connect(stream.as_raw_fd(), &nix::sys::socket::SockaddrIn::from(v4)).map_err(
        |e| match e {
            nix::errno::Errno::EINPROGRESS | nix::errno::Errno::EAGAIN => {
                io::ErrorKind::TimedOut.into()
            }
            e => io::Error::from(e),
        },
    )
}

/// A UDP socket connected to a frontend: one flow, whatever is sent on it.
pub struct UdpFlow {
    socket: UdpSocket,
}

impl UdpFlow {
    pub fn open(addr: SocketAddr) -> io::Result<Self> {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        socket.set_read_timeout(Some(TIMEOUT))?;
        // A connected socket only accepts datagrams from `addr`: a reply that was not
        // reverse-NATed never arrives.
        socket.connect(addr)?;
        Ok(Self { socket })
    }

    /// One datagram and who answered it.
    pub fn ask(&self) -> io::Result<Answer> {
        self.socket.send(b"hello")?;
        let mut buf = [0u8; 256];
        let n = self.socket.recv(&mut buf)?;
        Ok(Answer::parse(&String::from_utf8_lossy(&buf[..n])))
    }
}

/// One datagram from a fresh socket (a new flow) and who answered it.
pub fn udp_hello(addr: SocketAddr) -> io::Result<Answer> {
    UdpFlow::open(addr)?.ask()
}

/// How many of `count` new TCP connections each backend accepted ("error: …" for failures).
pub fn tcp_spread(addr: SocketAddr, count: usize) -> BTreeMap<String, usize> {
    tally((0..count).map(|_| Connection::open(addr).map(|c| c.answer)))
}

/// How many of `count` new UDP flows each backend answered ("error: …" for failures).
pub fn udp_spread(addr: SocketAddr, count: usize) -> BTreeMap<String, usize> {
    tally((0..count).map(|_| udp_hello(addr)))
}

fn tally(results: impl Iterator<Item = io::Result<Answer>>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for result in results {
        let key = result
            .map(|a| a.backend)
            .unwrap_or_else(|e| format!("error: {}", e.kind()));
        *counts.entry(key).or_default() += 1;
    }
    counts
}

/// Once this file exists in the pod, a running `wget_loop` stops.
pub const WGET_STOP: &str = "/tmp/stop-requests";

/// A command for a busybox container (CRI ExecSync) that GETs `url` `count` times, each over a
/// new connection and `pause` after the previous one, printing each body or `error` (after at
/// most 2 s: `timeout`, as Debian's busybox 1.35 `wget -T` crashes). It stops early once
/// `WGET_STOP` exists (made by the test: a loop removes an old one first), or after 5 errors in
/// a row (a dead address would take minutes).
pub fn wget_loop(url: &str, count: usize, pause: Duration) -> Vec<String> {
    let script = format!(
        "rm -f {WGET_STOP}; i=0; e=0; \
         while [ $i -lt {count} ] && [ $e -lt 5 ] && [ ! -e {WGET_STOP} ]; do \
         if timeout 2 wget -q -O - {url}; then e=0; else echo error; e=$((e+1)); fi; \
         sleep {pause:.3}; i=$((i+1)); done",
        pause = pause.as_secs_f64(),
    );
    vec!["sh".into(), "-c".into(), script]
}

/// How many lines of `output` (one answer each) said what.
pub fn tally_lines(output: &str) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for line in output.lines() {
        *counts.entry(line.trim().to_owned()).or_default() += 1;
    }
    counts
}

/// `GET path` over HTTP/1.0: the status code and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let mut conn = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    conn.set_read_timeout(Some(TIMEOUT))?;
    write!(conn, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    conn.read_to_string(&mut response)?;
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok());
    let code = code.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no HTTP status"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}
