//! node-agent's kernel side: Service load balancing in TC (and later XDP and cgroup) programs.
#![no_std]
#![no_main]

mod lb;
mod maps;
mod nat;
mod packet;
mod reject;
mod sctp;
mod tc_egress;
mod tc_ingress;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
