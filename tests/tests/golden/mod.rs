//! Golden packets through BPF_PROG_TEST_RUN (Katran-style fixtures: input frame → expected
//! verdict and output). The maps are programmed from real manifests through the agent's
//! compile → diff → apply path. A packet crosses the node as it would for real: tc_ingress,
//! then (unless dropped) tc_egress carrying the mark tc_ingress left.
#![allow(dead_code)] // each test file uses a different part of this module

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
};

use etherparse::{
    Icmpv4Type, IpHeaders, IpNumber, Ipv4Header, Ipv4Options, NetSlice, PacketBuilder,
    SlicedPacket, TransportSlice, icmpv4::DestUnreachableHeader,
};
use node_agent::{
    datapath::{Datapath, Hook},
    model::Node,
    proxy::{MapOp, Proxy},
    source::manifest,
};
use node_agent_tests::unique;
use node_common::{Config, ServiceValue};

pub const TC_ACT_OK: i32 = 0;
pub const TC_ACT_SHOT: i32 = 2;
pub const TC_ACT_REDIRECT: i32 = 7;

pub const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
pub const NODE_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];

pub fn sock(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Syn,
    SynAck,
    Ack,
    Udp,
    /// An SCTP INIT chunk.
    Sctp,
}

/// A frame as a client or backend would send it.
#[derive(Clone, Copy, Debug)]
pub struct Packet {
    pub l4: L4,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub ip_options: &'static [u8],
    pub more_fragments: bool,
}

impl Packet {
    pub fn new(l4: L4, src: SocketAddrV4, dst: SocketAddrV4) -> Self {
        Self {
            l4,
            src,
            dst,
            ip_options: &[],
            more_fragments: false,
        }
    }

    pub fn with_dst(self, dst: SocketAddrV4) -> Self {
        Self { dst, ..self }
    }

    pub fn with_src(self, src: SocketAddrV4) -> Self {
        Self { src, ..self }
    }

    fn ip_header(&self) -> Ipv4Header {
        let proto = match self.l4 {
            L4::Udp => IpNumber::UDP,
            L4::Sctp => IpNumber::SCTP,
            L4::Syn | L4::SynAck | L4::Ack => IpNumber::TCP,
        };
        let mut ip =
            Ipv4Header::new(0, 64, proto, self.src.ip().octets(), self.dst.ip().octets()).unwrap();
        ip.options = Ipv4Options::try_from(self.ip_options).unwrap();
        ip.more_fragments = self.more_fragments;
        ip
    }

    pub fn frame(&self) -> Vec<u8> {
        if self.l4 == L4::Sctp {
            return self.sctp_frame();
        }
        let builder = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
            .ip(IpHeaders::Ipv4(self.ip_header(), Default::default()));
        let (sport, dport) = (self.src.port(), self.dst.port());
        let payload = b"node-agent golden payload";
        let mut out = Vec::new();
        match self.l4 {
            L4::Syn => builder
                .tcp(sport, dport, 1000, 64240)
                .syn()
                .write(&mut out, &[]),
            L4::SynAck => builder
                .tcp(sport, dport, 5000, 64240)
                .syn()
                .ack(1001)
                .write(&mut out, &[]),
            L4::Ack => builder
                .tcp(sport, dport, 1001, 64240)
                .ack(5001)
                .write(&mut out, payload),
            L4::Udp => builder.udp(sport, dport).write(&mut out, payload),
            L4::Sctp => unreachable!("built by sctp_frame"),
        }
        .unwrap();
        out
    }

    /// Ethernet, IPv4 and an SCTP packet carrying an INIT chunk, with its CRC32c.
    fn sctp_frame(&self) -> Vec<u8> {
        let mut sctp = Vec::new();
        sctp.extend(self.src.port().to_be_bytes());
        sctp.extend(self.dst.port().to_be_bytes());
        sctp.extend([0, 0, 0, 0, 0, 0, 0, 0]); // verification tag 0 (INIT), checksum
        sctp.extend([1, 0, 0, 20]); // INIT, flags, chunk length
        sctp.extend([0xca, 0xfe, 0xf0, 0x0d, 0, 1, 0, 0, 0, 10, 0, 10, 0, 0, 0, 1]);
        let crc = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI).checksum(&sctp);
        sctp[8..12].copy_from_slice(&crc.to_le_bytes());
        let mut ip = self.ip_header();
        ip.set_payload_len(sctp.len()).unwrap();
        let mut out = Vec::new();
        etherparse::Ethernet2Header {
            source: CLIENT_MAC,
            destination: NODE_MAC,
            ether_type: etherparse::EtherType::IPV4,
        }
        .write(&mut out)
        .unwrap();
        ip.write(&mut out).unwrap();
        out.extend(sctp);
        out
    }

    /// The ICMP port-unreachable a REJECT answers this packet with: from the address the client
    /// targeted, quoting the IP header and the first 8 bytes after it, back to the sender's MAC.
    pub fn port_unreachable(&self) -> Vec<u8> {
        let frame = self.frame();
        let quote = &frame[14..14 + 20 + 8];
        let mut ip = Ipv4Header::new(
            0,
            64,
            IpNumber::ICMP,
            self.dst.ip().octets(),
            self.src.ip().octets(),
        )
        .unwrap();
        ip.dont_fragment = false;
        let mut out = Vec::new();
        PacketBuilder::ethernet2(NODE_MAC, CLIENT_MAC)
            .ip(IpHeaders::Ipv4(ip, Default::default()))
            .icmpv4(Icmpv4Type::DestinationUnreachable(
                DestUnreachableHeader::Port,
            ))
            .write(&mut out, quote)
            .unwrap();
        out
    }
}

/// The datapath loaded with its maps pinned in a fresh bpffs directory and programmed from
/// `manifests` (file name, content) for `node`. Unpinned on drop.
pub struct Fixture {
    datapath: Datapath,
}

impl Fixture {
    pub fn new(manifests: &[(&str, String)]) -> Self {
        Self::for_node(manifests, &Node::default(), &Config::default())
    }

    pub fn for_node(manifests: &[(&str, String)], node: &Node, config: &Config) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in manifests {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let loaded = manifest::load(dir.path()).unwrap();
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        let pins = Path::new("/sys/fs/bpf").join(unique("golden"));
        let mut datapath = Datapath::load(&pins, config).unwrap();
        let mut proxy = Proxy::new(node.clone());
        proxy.stage(loaded.changes);
        let report = proxy.sync(&mut datapath).unwrap();
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        Self { datapath }
    }

    /// Gives every frontend on `vip` the reverse-NAT id `id`, written straight into the maps
    /// (the agent hands out ids from 1: a large one needs this many frontends otherwise).
    pub fn renumber_rev_nat(&mut self, vip: Ipv4Addr, id: u32) {
        let state = self.datapath.read().unwrap();
        let mut old_ids = BTreeSet::new();
        for (key, value) in state.services.iter().filter(|(k, _)| k.ip() == vip) {
            let rev_nat = state.rev_nat[&value.rev_nat_id];
            old_ids.insert(value.rev_nat_id);
            let renumbered = ServiceValue {
                rev_nat_id: id,
                ..*value
            };
            self.datapath.write(&MapOp::PutRevNat(id, rev_nat)).unwrap();
            self.datapath
                .write(&MapOp::PutService(*key, renumbered))
                .unwrap();
        }
        for old in old_ids {
            self.datapath.write(&MapOp::DeleteRevNat(old)).unwrap();
        }
    }

    /// The frame through the node: the TC action and the frame that leaves it.
    pub fn run(&mut self, frame: &[u8]) -> (i32, Vec<u8>) {
        let ingress = self.datapath.test_run(Hook::Ingress, frame, 0).unwrap();
        if ingress.action == TC_ACT_SHOT {
            return (ingress.action, ingress.packet);
        }
        let egress = self
            .datapath
            .test_run(Hook::Egress, &ingress.packet, ingress.mark)
            .unwrap();
        let action = if egress.action == TC_ACT_OK {
            ingress.action
        } else {
            egress.action
        };
        (action, egress.packet)
    }
}

pub enum Expect {
    Unchanged,
    Dropped,
    Becomes(Vec<u8>),
    /// REJECT: this frame (an ICMP error) is sent back out of the device.
    Rejected(Vec<u8>),
}

/// One row: name, input frame, expected result. Rows run in order against the same maps, so a
/// reply row sees the conntrack entry its request row created.
pub struct Row {
    pub name: &'static str,
    pub input: Vec<u8>,
    pub expect: Expect,
}

/// Runs every row and fails with all the rows that did not match.
pub fn check_rows(fixture: &mut Fixture, rows: Vec<Row>) {
    let mut failures = Vec::new();
    for row in rows {
        let (action, output) = fixture.run(&row.input);
        let (want_action, want_output) = match row.expect {
            Expect::Unchanged => (TC_ACT_OK, Some(row.input.clone())),
            Expect::Becomes(frame) => (TC_ACT_OK, Some(frame)),
            Expect::Rejected(frame) => (TC_ACT_REDIRECT, Some(frame)),
            Expect::Dropped => (TC_ACT_SHOT, None),
        };
        if action != want_action || want_output.is_some_and(|want| want != output) {
            failures.push(format!(
                "{}: action {action}, output {:02x?}",
                row.name, output
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "failing rows:\n{}",
        failures.join("\n")
    );
}

/// What left the node, read back from the wire format, with every checksum verified.
#[derive(Debug, PartialEq, Eq)]
pub struct Seen {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
}

pub fn read(frame: &[u8]) -> Seen {
    let packet = SlicedPacket::from_ethernet(frame).expect("a parsable frame");
    let Some(NetSlice::Ipv4(ip)) = packet.net else {
        panic!("not IPv4: {frame:02x?}")
    };
    let header = ip.header().to_header();
    assert_eq!(
        header.header_checksum,
        header.calc_header_checksum(),
        "IP checksum"
    );
    let (src, dst) = (header.source.into(), header.destination.into());
    let payload = ip.payload().payload;
    let (sport, dport) = match packet.transport {
        Some(TransportSlice::Tcp(tcp)) => {
            let want = tcp
                .to_header()
                .calc_checksum_ipv4(&header, tcp.payload())
                .unwrap();
            assert_eq!(tcp.checksum(), want, "TCP checksum");
            (tcp.source_port(), tcp.destination_port())
        }
        Some(TransportSlice::Udp(udp)) => {
            if udp.checksum() != 0 {
                let want = udp
                    .to_header()
                    .calc_checksum_ipv4(&header, udp.payload())
                    .unwrap();
                assert_eq!(udp.checksum(), want, "UDP checksum");
            }
            (udp.source_port(), udp.destination_port())
        }
        // etherparse has no SCTP: its ports lead the payload (its CRC32c is checked by the
        // byte-exact SCTP rows).
        None if header.protocol == IpNumber::SCTP => (
            u16::from_be_bytes([payload[0], payload[1]]),
            u16::from_be_bytes([payload[2], payload[3]]),
        ),
        other => panic!("unexpected transport {other:?} in {payload:02x?}"),
    };
    Seen {
        src: sock(src, sport),
        dst: sock(dst, dport),
    }
}
