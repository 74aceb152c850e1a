//! A backend: TCP and UDP servers on one port that answer with the backend's name and the
//! client address they see (masqueraded or not). TCP connections get `NAME SEEN\n` and then
//! have every line echoed; UDP datagrams get `NAME SEEN`.
use std::{
    io::{BufRead as _, BufReader, ErrorKind, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::Duration,
};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::netns::Netns;

const POLL: Duration = Duration::from_millis(5);

pub struct BackendServer {
    pub name: String,
    tcp_accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl BackendServer {
    pub fn start(ns: &Netns, name: &str, port: u16) -> anyhow::Result<Self> {
        let any = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        let (tcp, udp) = ns.run(move || -> std::io::Result<_> {
            Ok((TcpListener::bind(any)?, UdpSocket::bind(any)?))
        })??;
        tcp.set_nonblocking(true)?;
        udp.set_read_timeout(Some(POLL))?;
        let server = Self {
            name: name.to_owned(),
            tcp_accepted: Arc::default(),
            stop: Arc::default(),
        };
        let (stop, accepted, reply) = (
            server.stop.clone(),
            server.tcp_accepted.clone(),
            name.to_owned(),
        );
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                // Wake at once for a connection (the benchmark measures through this server),
                // and every POLL to notice `stop`.
                let mut ready = [PollFd::new(tcp.as_fd(), PollFlags::POLLIN)];
                if !matches!(poll(&mut ready, PollTimeout::from(POLL.as_millis() as u16)), Ok(n) if n > 0)
                {
                    continue;
                }
                match tcp.accept() {
                    Ok((conn, peer)) => {
                        accepted.fetch_add(1, Ordering::Relaxed);
                        let (stop, greeting) = (stop.clone(), format!("{reply} {}", peer.ip()));
                        thread::spawn(move || serve_tcp(conn, &greeting, &stop));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => thread::sleep(POLL),
                }
            }
        });
        let (stop, reply) = (server.stop.clone(), name.to_owned());
        thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((_, peer)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(format!("{reply} {}", peer.ip()).as_bytes(), peer);
                }
            }
        });
        Ok(server)
    }

    /// TCP connections accepted so far.
    pub fn tcp_accepted(&self) -> usize {
        self.tcp_accepted.load(Ordering::Relaxed)
    }
}

fn serve_tcp(conn: TcpStream, greeting: &str, stop: &AtomicBool) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_nodelay(true);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(50)));
    let mut writer = match conn.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    if writeln!(writer, "{greeting}").is_err() {
        return;
    }
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                if writer.write_all(line.as_bytes()).is_err() {
                    return;
                }
                line.clear();
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

impl Drop for BackendServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
