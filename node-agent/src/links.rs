//! The network interfaces of the agent's namespace, read over rtnetlink (RTM_GETLINK dump):
//! sysfs would show the namespace sysfs was mounted in, not the agent's.
use std::{collections::BTreeMap, io, os::fd::AsRawFd as _, thread};

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, sendto,
    socket,
};
use tracing::warn;

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const IFLA_IFNAME: u16 = 3;
const IFLA_MASTER: u16 = 10;
/// The rtnetlink multicast group of link changes.
const RTMGRP_LINK: u32 = 1;
const NLMSG_HEADER: usize = 16;
const IFINFOMSG: usize = 16;

/// An interface: its index, name and the index of the bridge it is a port of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub master: Option<u32>,
}

/// The names of the ports of `bridge` (none when there is no such bridge).
pub fn bridge_ports(bridge: &str) -> io::Result<Vec<String>> {
    let links = dump()?;
    Ok(ports_of(&links, bridge))
}

fn ports_of(links: &[Link], bridge: &str) -> Vec<String> {
    let Some(bridge) = links.iter().find(|l| l.name == bridge) else {
        return Vec::new();
    };
    links
        .iter()
        .filter(|l| l.master == Some(bridge.index))
        .map(|l| l.name.clone())
        .collect()
}

/// Calls `changed` after each change to the namespace's interfaces (one appearing, joining a
/// bridge, going), from a thread of its own, until `changed` returns false.
pub fn watch(mut changed: impl FnMut() -> bool + Send + 'static) -> io::Result<()> {
    let fd = route_socket()?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, RTMGRP_LINK))?;
    thread::Builder::new()
        .name("link-changes".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                    // An overrun lost some events: a change all the same.
                    Ok(_) | Err(Errno::ENOBUFS) => {
                        if !changed() {
                            return;
                        }
                    }
                    Err(Errno::EINTR) => {}
                    Err(e) => {
                        warn!("watching interface changes stopped: {e}");
                        return;
                    }
                }
            }
        })?;
    Ok(())
}

fn route_socket() -> nix::Result<std::os::fd::OwnedFd> {
    socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )
}

/// Every interface of the namespace.
fn dump() -> io::Result<Vec<Link>> {
    let fd = route_socket()?;
    let mut request = Vec::with_capacity(NLMSG_HEADER + IFINFOMSG);
    request.extend_from_slice(&((NLMSG_HEADER + IFINFOMSG) as u32).to_ne_bytes());
    request.extend_from_slice(&RTM_GETLINK.to_ne_bytes());
    request.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    request.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    request.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel picks
    request.extend_from_slice(&[0; IFINFOMSG]); // AF_UNSPEC: every link
    sendto(
        fd.as_raw_fd(),
        &request,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )?;
    let mut links = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        if parse(&buf[..n], &mut links)? {
            return Ok(links);
        }
    }
}

/// Adds the links in one datagram of a dump's answer; true once the dump is done.
fn parse(mut datagram: &[u8], links: &mut Vec<Link>) -> io::Result<bool> {
    while datagram.len() >= NLMSG_HEADER {
        let len = u32_at(datagram, 0) as usize;
        let kind = u16_at(datagram, 4);
        if len < NLMSG_HEADER || len > datagram.len() {
            return Err(io::Error::other("truncated netlink message"));
        }
        let body = &datagram[NLMSG_HEADER..len];
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = body
                    .get(..4)
                    .map_or(0, |b| i32::from_ne_bytes(b.try_into().unwrap()));
                return Err(io::Error::from_raw_os_error(-errno));
            }
            RTM_NEWLINK if body.len() >= IFINFOMSG => links.push(link(body)),
            _ => {}
        }
        datagram = &datagram[align(len).min(datagram.len())..];
    }
    Ok(false)
}

/// An ifinfomsg and its attributes.
fn link(body: &[u8]) -> Link {
    let mut link = Link {
        index: u32_at(body, 4),
        name: String::new(),
        master: None,
    };
    let attributes: BTreeMap<u16, &[u8]> = Attributes(&body[IFINFOMSG..]).collect();
    if let Some(name) = attributes.get(&IFLA_IFNAME) {
        let name = name.split(|&b| b == 0).next().unwrap_or_default();
        link.name = String::from_utf8_lossy(name).into_owned();
    }
    link.master = attributes
        .get(&IFLA_MASTER)
        .filter(|v| v.len() >= 4)
        .map(|v| u32_at(v, 0));
    link
}

/// rtattrs: (type, payload).
struct Attributes<'a>(&'a [u8]);

impl<'a> Iterator for Attributes<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.len() < 4 {
            return None;
        }
        let len = usize::from(u16_at(self.0, 0));
        if len < 4 || len > self.0.len() {
            return None;
        }
        let item = (u16_at(self.0, 2), &self.0[4..len]);
        self.0 = &self.0[align(len).min(self.0.len())..];
        Some(item)
    }
}

fn align(len: usize) -> usize {
    (len + 3) & !3
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attribute(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(payload);
        a.resize(align(a.len()), 0);
        a
    }

    fn message(kind: u16, index: u32, name: &str, master: Option<u32>) -> Vec<u8> {
        let mut body = vec![0u8; IFINFOMSG];
        body[4..8].copy_from_slice(&index.to_ne_bytes());
        body.extend(attribute(IFLA_IFNAME, format!("{name}\0").as_bytes()));
        if let Some(m) = master {
            body.extend(attribute(IFLA_MASTER, &m.to_ne_bytes()));
        }
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HEADER + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend(body);
        m
    }

    #[test]
    fn parses_a_dump_and_finds_bridge_ports() {
        let mut datagram = message(RTM_NEWLINK, 1, "lo", None);
        datagram.extend(message(RTM_NEWLINK, 4, "na0", None));
        datagram.extend(message(RTM_NEWLINK, 5, "veth1a2b", Some(4)));
        datagram.extend(message(RTM_NEWLINK, 6, "eth0", Some(9)));
        let mut links = Vec::new();
        assert!(!parse(&datagram, &mut links).unwrap());
        assert!(parse(&message(NLMSG_DONE, 0, "", None), &mut links).unwrap());
        assert_eq!(links.len(), 4);
        assert_eq!(links[2].master, Some(4));
        assert_eq!(ports_of(&links, "na0"), ["veth1a2b"]);
        assert!(ports_of(&links, "cni0").is_empty());
    }

    #[test]
    fn truncated_messages_are_an_error() {
        let mut m = message(RTM_NEWLINK, 1, "lo", None);
        m.truncate(m.len() - 8);
        m[0..4].copy_from_slice(&100u32.to_ne_bytes());
        assert!(parse(&m, &mut Vec::new()).is_err());
    }

    #[test]
    fn dumps_this_namespace() {
        // Every namespace has a loopback interface.
        let links = dump().unwrap();
        assert!(links.iter().any(|l| l.name == "lo"), "{links:?}");
    }
}
