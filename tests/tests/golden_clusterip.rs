//! ClusterIP golden packets: DNAT, reverse NAT, stickiness, REJECT and what passes untouched.
//! Expected frames are built from scratch by etherparse, so matching them byte for byte also
//! proves the IP, L4 and ICMP checksums.
mod golden;

use std::{collections::BTreeSet, net::Ipv4Addr};

use golden::{Expect, Fixture, L4, Packet, Row, TC_ACT_OK, check_rows, sock};
use node_agent_tests::manifest::{endpoint_slice, service};

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
const WEB_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const DNS_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 53);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 99);
const WEB_BACKEND: Ipv4Addr = Ipv4Addr::new(198, 18, 11, 2);
const DNS_BACKEND: Ipv4Addr = Ipv4Addr::new(198, 18, 12, 2);
const SCTP_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 38);
const SCTP_BACKEND: Ipv4Addr = Ipv4Addr::new(198, 18, 13, 2);

fn zero_udp_checksum(mut frame: Vec<u8>) -> Vec<u8> {
    let l4 = 14 + usize::from(frame[14] & 0x0f) * 4;
    frame[l4 + 6..l4 + 8].copy_from_slice(&[0, 0]);
    frame
}

#[test]
fn clusterip_golden_packets() {
    let mut fixture = Fixture::new(&[
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
            service(
                "empty",
                EMPTY_VIP,
                &[("http", 80, "TCP"), ("dns", 53, "UDP")],
            ),
        ),
        (
            "sctp.yaml",
            service(
                "diameter",
                SCTP_VIP,
                &[("diameter", 3868, "SCTP"), ("same", 3869, "SCTP")],
            ),
        ),
        (
            "sctp-slice.yaml",
            endpoint_slice(
                "diameter-1",
                "diameter",
                &[("diameter", 3869, "SCTP"), ("same", 3869, "SCTP")],
                &[SCTP_BACKEND],
            ),
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
    let no_endpoints_tcp = Packet::new(L4::Syn, client, sock(EMPTY_VIP, 80));
    let no_endpoints_udp = Packet::new(L4::Udp, client, sock(EMPTY_VIP, 53));
    let sctp = Packet::new(L4::Sctp, sock(CLIENT, 40006), sock(SCTP_VIP, 3868));
    let sctp_reply = Packet::new(L4::Sctp, sock(SCTP_BACKEND, 3869), sock(CLIENT, 40006));
    let sctp_same_port = Packet::new(L4::Sctp, sock(CLIENT, 40007), sock(SCTP_VIP, 3869));
    let other_port = Packet::new(L4::Syn, client, sock(WEB_VIP, 81));
    let other_protocol = Packet::new(L4::Udp, client, sock(WEB_VIP, 80));
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
            name: "another port of the ClusterIP is rejected",
            input: other_port.frame(),
            expect: Expect::Rejected(other_port.port_unreachable()),
        },
        Row {
            name: "another protocol on the Service port is rejected",
            input: other_protocol.frame(),
            expect: Expect::Rejected(other_protocol.port_unreachable()),
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
            name: "SCTP to a ClusterIP is DNATed to another port, its CRC32c computed again",
            input: sctp.frame(),
            expect: Expect::Becomes(sctp.with_dst(sock(SCTP_BACKEND, 3869)).frame()),
        },
        Row {
            name: "the SCTP reply is reverse-NATed, its CRC32c computed again",
            input: sctp_reply.frame(),
            expect: Expect::Becomes(sctp_reply.with_src(sock(SCTP_VIP, 3868)).frame()),
        },
        Row {
            name: "SCTP with an unchanged port keeps its CRC32c (addresses are not covered)",
            input: sctp_same_port.frame(),
            expect: Expect::Becomes(sctp_same_port.with_dst(sock(SCTP_BACKEND, 3869)).frame()),
        },
        Row {
            name: "TCP to a Service without endpoints is rejected with ICMP port unreachable",
            input: no_endpoints_tcp.frame(),
            expect: Expect::Rejected(no_endpoints_tcp.port_unreachable()),
        },
        Row {
            name: "UDP to a Service without endpoints is rejected with ICMP port unreachable",
            input: no_endpoints_udp.frame(),
            expect: Expect::Rejected(no_endpoints_udp.port_unreachable()),
        },
    ];
    check_rows(&mut fixture, rows);
}

#[test]
fn new_flows_spread_over_backends_and_each_flow_stays_on_its_own() {
    let backends: Vec<Ipv4Addr> = (1..=3).map(|i| Ipv4Addr::new(198, 18, 10 + i, 2)).collect();
    let mut fixture = Fixture::new(&[
        ("web.yaml", service("web", WEB_VIP, &[("http", 80, "TCP")])),
        (
            "web-slice.yaml",
            endpoint_slice("web-1", "web", &[("http", 8080, "TCP")], &backends),
        ),
    ]);
    let mut chosen = |packet: Packet| {
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

/// The reverse-NAT id travels from tc_ingress to tc_egress in the skb mark: one past 16 bits
/// (more than 65,535 frontends) must still translate replies.
#[test]
fn a_reverse_nat_id_beyond_16_bits_still_translates_replies() {
    let mut fixture = Fixture::new(&[
        ("web.yaml", service("web", WEB_VIP, &[("http", 80, "TCP")])),
        (
            "web-slice.yaml",
            endpoint_slice("web-1", "web", &[("http", 8080, "TCP")], &[WEB_BACKEND]),
        ),
    ]);
    // Its low 16 bits (0x2345) name no entry: a truncated id finds nothing.
    fixture.renumber_rev_nat(WEB_VIP, 0x1_2345);
    let client = sock(CLIENT, 40100);
    let syn = Packet::new(L4::Syn, client, sock(WEB_VIP, 80));
    let syn_ack = Packet::new(L4::SynAck, sock(WEB_BACKEND, 8080), client);
    check_rows(
        &mut fixture,
        vec![
            Row {
                name: "SYN DNATed",
                input: syn.frame(),
                expect: Expect::Becomes(syn.with_dst(sock(WEB_BACKEND, 8080)).frame()),
            },
            Row {
                name: "reply reverse-NATed through reverse-NAT id 0x12345",
                input: syn_ack.frame(),
                expect: Expect::Becomes(syn_ack.with_src(sock(WEB_VIP, 80)).frame()),
            },
        ],
    );
}
