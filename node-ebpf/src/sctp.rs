//! SCTP's checksum is a CRC32c over the SCTP packet alone (no pseudo-header): rewriting an
//! address leaves it valid, rewriting a port means computing it again. Unlike the Internet
//! checksum it cannot be patched incrementally with the kernel's csum helpers.
use aya_ebpf::{cty::c_long, programs::TcContext};

use crate::packet::ETH_HLEN;

/// The longest SCTP packet (header and chunks) whose CRC the datapath recomputes: an MTU's
/// worth. A longer one whose port must change is dropped rather than sent with a bad CRC.
const MAX_SCTP_LEN: usize = 1500;
/// Offset of the checksum in the SCTP common header.
const CRC_OFF: usize = 8;
const E2BIG: c_long = 7;

/// CRC32c (Castagnoli, reflected polynomial 0x82F63B78), one entry per byte value.
static CRC32C_TABLE: [u32; 256] = crc32c_table();

const fn crc32c_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut n = 0;
    while n < 256 {
        let mut c = n as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0x82f6_3b78 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[n] = c;
        n += 1;
    }
    table
}

/// Computes the SCTP packet's CRC32c again (its checksum field counted as zero) and stores it.
#[inline(always)]
pub fn update_crc(ctx: &TcContext, l4_off: usize) -> Result<(), c_long> {
    // From the IP total length, not the skb's: a short frame may carry Ethernet padding.
    let total = usize::from(u16::from_be(ctx.load::<u16>(ETH_HLEN + 2)?));
    let len = total.wrapping_sub(l4_off - ETH_HLEN);
    // SCTP pads every chunk to 4 bytes, so a valid packet is whole words.
    if len > MAX_SCTP_LEN || len % 4 != 0 {
        return Err(-E2BIG);
    }
    let mut crc = !0u32;
    let mut word = 0;
    while word < MAX_SCTP_LEN / 4 && word * 4 < len {
        let bytes: [u8; 4] = if word * 4 == CRC_OFF {
            [0; 4]
        } else {
            ctx.load(l4_off + word * 4)?
        };
        for byte in bytes {
            crc = CRC32C_TABLE[((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8);
        }
        word += 1;
    }
    // The CRC goes on the wire least significant byte first.
    ctx.store(l4_off + CRC_OFF, &(!crc).to_le_bytes(), 0)
}
