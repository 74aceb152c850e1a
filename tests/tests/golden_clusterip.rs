//! Golden packets through BPF_PROG_TEST_RUN: an input frame and the maps (programmed from real
//! manifests through the agent's compile → diff → apply path) give an expected verdict and
//! output bytes. Expected frames are built from scratch by etherparse, so matching them byte
//! for byte also proves the IP and L4 checksums.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
};

use etherparse::{IpHeaders, IpNumber, Ipv4Header, Ipv4Options, PacketBuilder};
use node_agent::{datapath::Datapath, proxy::Proxy, source::manifest};
use node_agent_tests::{
    manifest::{endpoint_slice, service},
    unique,
};

const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
const WEB_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const DNS_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 53);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 99);
const WEB_BACKEND: Ipv4Addr = Ipv4Addr::new(198, 18, 11, 2);
const DNS_BACKEND: Ipv4Addr = Ipv4Addr::new(198, 18, 12, 2);

fn sock(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

#[derive(Clone, Copy)]
enum L4 {
    Syn,
    SynAck,
    Ack,
    Udp,
}

/// A frame as a client or backend would send it.
#[derive(Clone, Copy)]
struct Packet {
    l4: L4,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    ip_options: &'static [u8],
    more_fragments: bool,
}

impl Packet {
    fn new(l4: L4, src: SocketAddrV4, dst: SocketAddrV4) -> Self {
        Self {
            l4,
            src,
            dst,
            ip_options: &[],
            more_fragments: false,
        }
    }

    fn with_dst(self, dst: SocketAddrV4) -> Self {
        Self { dst, ..self }
    }

    fn with_src(self, src: SocketAddrV4) -> Self {
        Self { src, ..self }
    }

    fn frame(&self) -> Vec<u8> {
        let proto = if matches!(self.l4, L4::Udp) {
            IpNumber::UDP
        } else {
            IpNumber::TCP
        };
        let mut ip =
            Ipv4Header::new(0, 64, proto, self.src.ip().octets(), self.dst.ip().octets()).unwrap();
        ip.options = Ipv4Options::try_from(self.ip_options).unwrap();
        ip.more_fragments = self.more_fragments;
        let builder = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ip(IpHeaders::Ipv4(ip, Default::default()));
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
        }
        .unwrap();
        out
    }
}

/// The datapath loaded with its maps pinned in a fresh bpffs directory and programmed from
/// `manifests` (file name, content) the way the agent does it. Unpinned on drop.
struct Fixture {
    datapath: Datapath,
}

impl Fixture {
    fn new(manifests: &[(&str, String)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in manifests {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let loaded = manifest::load(dir.path()).unwrap();
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        let mut datapath =
            Datapath::load(&Path::new("/sys/fs/bpf").join(unique("golden"))).unwrap();
        let report = Proxy::default()
            .sync(&loaded.cluster, &mut datapath)
            .unwrap();
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        Self { datapath }
    }

    fn run(&self, frame: &[u8]) -> (i32, Vec<u8>) {
        let out = self.datapath.test_run(frame).unwrap();
        (out.action, out.packet)
    }
}

enum Expect {
    Unchanged,
    Dropped,
    Becomes(Vec<u8>),
}

/// One row of the table: name, input frame, expected result. Rows run in order against the
/// same maps, so a reply row sees the conntrack entry its request row created.
struct Row {
    name: &'static str,
    input: Vec<u8>,
    expect: Expect,
}

fn zero_udp_checksum(mut frame: Vec<u8>) -> Vec<u8> {
    let l4 = 14 + usize::from(frame[14] & 0x0f) * 4;
    frame[l4 + 6..l4 + 8].copy_from_slice(&[0, 0]);
    frame
}

#[test]
fn clusterip_golden_packets() {
    let fixture = Fixture::new(&[
        ("web.yaml", service("web", WEB_VIP, &[("http", 80, "TCP")])),
        (
            "web-slice.yaml",
            endpoint_slice("web-1", "web", &[("http", 8080, "TCP")], &[WEB_BACKEND]),
        ),
        ("dns.yaml", service("dns", DNS_VIP, &[("dns", 53, "UDP")])),
        (
            "dns-slice.yaml",
            endpoint_slice("dns-1", "dns", &[("dns", 5353, "UDP")], &[DNS_BACKEND]),
        ),
        (
            "empty.yaml",
            service("empty", EMPTY_VIP, &[("http", 80, "TCP")]),
        ),
    ]);
    let client = sock(CLIENT, 40000);
    let syn = Packet::new(L4::Syn, client, sock(WEB_VIP, 80));
    let syn_ack = Packet::new(L4::SynAck, sock(WEB_BACKEND, 8080), client);
    let ack = Packet::new(L4::Ack, client, sock(WEB_VIP, 80));
    let udp = Packet::new(L4::Udp, sock(CLIENT, 40001), sock(DNS_VIP, 53));
    let udp_reply = Packet::new(L4::Udp, sock(DNS_BACKEND, 5353), sock(CLIENT, 40001));
    let no_csum = Packet::new(L4::Udp, sock(CLIENT, 40002), sock(DNS_VIP, 53));
    let options = Packet {
        ip_options: &[1, 1, 1, 0],
        ..Packet::new(L4::Syn, sock(CLIENT, 40003), sock(WEB_VIP, 80))
    };
    let fragment = Packet {
        more_fragments: true,
        ..Packet::new(L4::Udp, sock(CLIENT, 40004), sock(DNS_VIP, 53))
    };
    let mut arp = vec![0xff; 6];
    arp.extend([2, 0, 0, 0, 0, 1, 0x08, 0x06]);
    arp.extend([0u8; 28]);

    let rows = vec![
        Row {
            name: "TCP SYN to a ClusterIP is DNATed to its backend",
            input: syn.frame(),
            expect: Expect::Becomes(syn.with_dst(sock(WEB_BACKEND, 8080)).frame()),
        },
        Row {
            name: "the backend's reply is reverse-NATed to the ClusterIP",
            input: syn_ack.frame(),
            expect: Expect::Becomes(syn_ack.with_src(sock(WEB_VIP, 80)).frame()),
        },
        Row {
            name: "a later packet of the flow (with payload) goes to the same backend",
            input: ack.frame(),
            expect: Expect::Becomes(ack.with_dst(sock(WEB_BACKEND, 8080)).frame()),
        },
        Row {
            name: "UDP datagram to a ClusterIP is DNATed",
            input: udp.frame(),
            expect: Expect::Becomes(udp.with_dst(sock(DNS_BACKEND, 5353)).frame()),
        },
        Row {
            name: "UDP reply is reverse-NATed",
            input: udp_reply.frame(),
            expect: Expect::Becomes(udp_reply.with_src(sock(DNS_VIP, 53)).frame()),
        },
        Row {
            name: "UDP without a checksum keeps none",
            input: zero_udp_checksum(no_csum.frame()),
            expect: Expect::Becomes(zero_udp_checksum(
                no_csum.with_dst(sock(DNS_BACKEND, 5353)).frame(),
            )),
        },
        Row {
            name: "IP options: L4 ports found after the options",
            input: options.frame(),
            expect: Expect::Becomes(options.with_dst(sock(WEB_BACKEND, 8080)).frame()),
        },
        Row {
            name: "a packet straight to a backend with no flow passes untouched",
            input: Packet::new(L4::Syn, sock(CLIENT, 40005), sock(WEB_BACKEND, 8080)).frame(),
            expect: Expect::Unchanged,
        },
        Row {
            name: "another port of the ClusterIP passes untouched",
            input: Packet::new(L4::Syn, client, sock(WEB_VIP, 81)).frame(),
            expect: Expect::Unchanged,
        },
        Row {
            name: "another protocol on the Service port passes untouched",
            input: Packet::new(L4::Udp, client, sock(WEB_VIP, 80)).frame(),
            expect: Expect::Unchanged,
        },
        Row {
            name: "an IP fragment passes untouched",
            input: fragment.frame(),
            expect: Expect::Unchanged,
        },
        Row {
            name: "non-IPv4 (ARP) passes untouched",
            input: arp,
            expect: Expect::Unchanged,
        },
        Row {
            name: "a Service without endpoints drops",
            input: Packet::new(L4::Syn, client, sock(EMPTY_VIP, 80)).frame(),
            expect: Expect::Dropped,
        },
    ];

    let mut failures = Vec::new();
    for row in rows {
        let (action, output) = fixture.run(&row.input);
        let (want_action, want_output) = match row.expect {
            Expect::Unchanged => (TC_ACT_OK, Some(row.input.clone())),
            Expect::Becomes(frame) => (TC_ACT_OK, Some(frame)),
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

#[test]
fn new_flows_spread_over_backends_and_each_flow_stays_on_its_own() {
    let backends: Vec<Ipv4Addr> = (1..=3).map(|i| Ipv4Addr::new(198, 18, 10 + i, 2)).collect();
    let fixture = Fixture::new(&[
        ("web.yaml", service("web", WEB_VIP, &[("http", 80, "TCP")])),
        (
            "web-slice.yaml",
            endpoint_slice("web-1", "web", &[("http", 8080, "TCP")], &backends),
        ),
    ]);
    let chosen = |packet: Packet| {
        let (action, output) = fixture.run(&packet.frame());
        assert_eq!(action, TC_ACT_OK);
        *backends
            .iter()
            .find(|&&b| output == packet.with_dst(sock(b, 8080)).frame())
            .unwrap_or_else(|| {
                panic!(
                    "{:?} was not DNATed to a backend: {output:02x?}",
                    packet.src
                )
            })
    };
    let mut used = BTreeSet::new();
    for port in 41000..41060 {
        let client = sock(CLIENT, port);
        let first = chosen(Packet::new(L4::Syn, client, sock(WEB_VIP, 80)));
        for _ in 0..3 {
            assert_eq!(
                chosen(Packet::new(L4::Ack, client, sock(WEB_VIP, 80))),
                first,
                "flow from port {port} moved"
            );
        }
        used.insert(first);
    }
    assert_eq!(
        used.len(),
        3,
        "60 new flows over 3 backends used only {used:?}"
    );
}
