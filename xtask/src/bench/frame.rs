//! Frames for BPF_PROG_TEST_RUN.
use std::net::SocketAddrV4;

/// An Ethernet/IPv4/TCP frame (an ACK, no payload) from `src` to `dst`. Checksums stay zero:
/// a TC test run never verifies them, and the datapath only updates them incrementally.
pub fn tcp_frame(src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
    let mut frame = Vec::with_capacity(54);
    frame.extend([0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02]); // dst, src MAC
    frame.extend(0x0800u16.to_be_bytes()); // IPv4
    frame.extend([0x45, 0]); // version 4, 20-byte header
    frame.extend(40u16.to_be_bytes()); // total length
    frame.extend([0, 0, 0x40, 0, 64, 6, 0, 0]); // id, DF, TTL 64, TCP, checksum
    frame.extend(src.ip().octets());
    frame.extend(dst.ip().octets());
    frame.extend(src.port().to_be_bytes());
    frame.extend(dst.port().to_be_bytes());
    frame.extend(1u32.to_be_bytes()); // sequence
    frame.extend(0u32.to_be_bytes()); // acknowledgement
    frame.extend([5 << 4, 0x10]); // 20-byte header, ACK
    frame.extend([0xff, 0xff, 0, 0, 0, 0]); // window, checksum, urgent pointer
    frame
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn frame_fields() {
        let src = SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 2), 40000);
        let dst = SocketAddrV4::new(Ipv4Addr::new(198, 19, 255, 254), 9999);
        let frame = tcp_frame(src, dst);
        assert_eq!(frame.len(), 54);
        let u16_at = |at: usize| u16::from_be_bytes([frame[at], frame[at + 1]]);
        for (what, at, want) in [
            ("ethertype", 12, 0x0800),
            ("IP total length", 16, 40),
            ("source port", 34, 40000),
            ("destination port", 36, 9999),
        ] {
            assert_eq!(u16_at(at), want, "{what}");
        }
        assert_eq!((frame[14], frame[23]), (0x45, 6), "IPv4, TCP");
        assert_eq!(frame[26..30], [198, 18, 1, 2]);
        assert_eq!(frame[30..34], [198, 19, 255, 254]);
        assert_eq!(frame[46] >> 4, 5, "TCP data offset");
    }
}
