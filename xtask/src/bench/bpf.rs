//! node-agent's pinned maps and attached programs through the bpf() syscall itself: xtask links
//! no eBPF library, so that it builds before the eBPF toolchain is installed. Layouts are
//! `union bpf_attr` of linux/include/uapi/linux/bpf.h.
use std::{
    ffi::{CStr, CString},
    fs,
    mem::MaybeUninit,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use anyhow::{Context as _, bail};
use nix::libc;

const BPF_MAP_LOOKUP_ELEM: u32 = 1;
const BPF_OBJ_GET: u32 = 7;
const BPF_PROG_TEST_RUN: u32 = 10;
const BPF_PROG_GET_FD_BY_ID: u32 = 13;
const BPF_PROG_QUERY: u32 = 16;
/// TCX ingress, as node-agent attaches on this kernel.
const BPF_TCX_INGRESS: u32 = 46;

/// `union bpf_attr` is larger; the kernel takes any size whose unused tail is zero.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Attr([u64; 16]);

impl Attr {
    /// Sets the `__u32` at byte `offset`.
    fn u32_at(mut self, offset: usize, value: u32) -> Self {
        // Byte offsets in memory order, whatever the host's endianness.
        let word = &mut self.0[offset / 8];
        let mut raw = word.to_ne_bytes();
        let at = offset % 8;
        raw[at..at + 4].copy_from_slice(&value.to_ne_bytes());
        *word = u64::from_ne_bytes(raw);
        self
    }

    /// Sets the `__aligned_u64` at byte `offset` (a pointer, mostly).
    fn u64_at(mut self, offset: usize, value: u64) -> Self {
        self.0[offset / 8] = value;
        self
    }

    fn u32_of(&self, offset: usize) -> u32 {
        let raw = self.0[offset / 8].to_ne_bytes();
        let at = offset % 8;
        u32::from_ne_bytes(raw[at..at + 4].try_into().expect("4 bytes"))
    }

    /// bpf(`cmd`, self): the kernel's non-negative answer (a descriptor, or 0).
    fn call(&mut self, cmd: u32) -> std::io::Result<i64> {
        // SAFETY: a zero-padded bpf_attr whose pointers the callers keep alive for the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                self.0.as_mut_ptr(),
                size_of_val(&self.0),
            )
        };
        if ret < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(ret)
    }

    /// As `call`, for commands that return a new descriptor.
    fn open(&mut self, cmd: u32) -> std::io::Result<OwnedFd> {
        let fd = self.call(cmd)?;
        // SAFETY: the kernel just returned this descriptor to us.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }
}

fn obj_get(path: &CStr) -> Attr {
    // pathname; bpf_fd and file_flags stay 0
    Attr::default().u64_at(0, path.as_ptr() as u64)
}

fn map_lookup(map_fd: i32, key: u64, value: u64) -> Attr {
    Attr::default()
        .u32_at(0, map_fd as u32)
        .u64_at(8, key)
        .u64_at(16, value)
}

fn prog_query(ifindex: u32, attach_type: u32, ids: u64, capacity: u32) -> Attr {
    Attr::default()
        .u32_at(0, ifindex)
        .u32_at(4, attach_type)
        .u64_at(16, ids)
        .u32_at(24, capacity)
}

fn prog_get_fd_by_id(id: u32) -> Attr {
    Attr::default().u32_at(0, id)
}

fn test_run(prog_fd: i32, data: &[u8]) -> Attr {
    Attr::default()
        .u32_at(0, prog_fd as u32)
        .u32_at(8, data.len() as u32)
        .u64_at(16, data.as_ptr() as u64)
        // repeat = 1: more would run again over the packet the first run rewrote.
        .u32_at(32, 1)
}

pub struct PinnedMap(OwnedFd);

impl PinnedMap {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let path_c = CString::new(path.as_os_str().as_bytes())?;
        let fd = obj_get(&path_c)
            .open(BPF_OBJ_GET)
            .with_context(|| format!("opening pinned map {}", path.display()))?;
        Ok(Self(fd))
    }

    /// The value under `key`; `V` must be the map's value type (plain data).
    pub fn get<K, V>(&self, key: &K) -> Option<V> {
        let mut value = MaybeUninit::<V>::zeroed();
        let mut attr = map_lookup(
            self.0.as_raw_fd(),
            key as *const K as u64,
            value.as_mut_ptr() as u64,
        );
        // SAFETY: on success the kernel filled the whole value.
        attr.call(BPF_MAP_LOOKUP_ELEM)
            .ok()
            .map(|_| unsafe { value.assume_init() })
    }

    /// The kernel memory charged to the map (`memlock:` of its fdinfo), in bytes.
    pub fn memlock(&self) -> anyhow::Result<u64> {
        let path = format!("/proc/self/fdinfo/{}", self.0.as_raw_fd());
        fdinfo_memlock(&fs::read_to_string(&path)?).with_context(|| format!("no memlock in {path}"))
    }
}

fn fdinfo_memlock(fdinfo: &str) -> Option<u64> {
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
}

/// A program attached to a device, held open by descriptor.
pub struct Program(OwnedFd);

impl Program {
    /// The one TCX ingress program on device `ifindex` of the calling thread's namespace.
    pub fn tcx_ingress(ifindex: u32) -> anyhow::Result<Self> {
        let mut ids = [0u32; 8];
        let mut attr = prog_query(
            ifindex,
            BPF_TCX_INGRESS,
            ids.as_mut_ptr() as u64,
            ids.len() as u32,
        );
        attr.call(BPF_PROG_QUERY).context("BPF_PROG_QUERY")?;
        let count = attr.u32_of(24);
        if count != 1 {
            bail!("expected one TCX ingress program on ifindex {ifindex}, found {count}");
        }
        let fd = prog_get_fd_by_id(ids[0])
            .open(BPF_PROG_GET_FD_BY_ID)
            .context("BPF_PROG_GET_FD_BY_ID")?;
        Ok(Self(fd))
    }

    /// Runs the program once over `frame` against the live maps: the kernel's run time in ns.
    pub fn time(&self, frame: &[u8]) -> anyhow::Result<u32> {
        let mut attr = test_run(self.0.as_raw_fd(), frame);
        attr.call(BPF_PROG_TEST_RUN).context("BPF_PROG_TEST_RUN")?;
        Ok(attr.u32_of(36))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The attr as bytes, for comparing with bpf.h's offsets.
    fn bytes(attr: &Attr) -> Vec<u8> {
        attr.0.iter().flat_map(|w| w.to_ne_bytes()).collect()
    }

    /// (byte offset, value, width).
    type Field = (usize, u64, usize);

    #[test]
    fn attr_fields_land_at_their_offsets() {
        let data = [0u8; 54];
        let cases: [(Attr, &[Field]); 4] = [
            // (offset, value, width): everything else stays zero.
            (
                prog_query(7, BPF_TCX_INGRESS, 0x1000, 8),
                &[(0, 7, 4), (4, 46, 4), (16, 0x1000, 8), (24, 8, 4)],
            ),
            (prog_get_fd_by_id(42), &[(0, 42, 4)]),
            (
                map_lookup(3, 0x10, 0x20),
                &[(0, 3, 4), (8, 0x10, 8), (16, 0x20, 8)],
            ),
            (
                test_run(5, &data),
                &[
                    (0, 5, 4),
                    (8, 54, 4),
                    (16, data.as_ptr() as u64, 8),
                    (32, 1, 4),
                ],
            ),
        ];
        for (attr, fields) in cases {
            let mut want = vec![0u8; size_of::<Attr>()];
            for &(offset, value, width) in fields {
                want[offset..offset + width].copy_from_slice(&value.to_ne_bytes()[..width]);
            }
            assert_eq!(bytes(&attr), want, "{fields:?}");
        }
    }

    #[test]
    fn reads_back_u32_fields() {
        let attr = Attr::default().u32_at(36, 1234).u32_at(32, 1);
        assert_eq!((attr.u32_of(32), attr.u32_of(36)), (1, 1234));
    }

    #[test]
    fn memlock_from_fdinfo() {
        let fdinfo = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1\nmap_type:\t1\nkey_size:\t12\nvalue_size:\t8\nmax_entries:\t65536\nmap_flags:\t0x0\nmap_extra:\t0x0\nmemlock:\t5767168\nmap_id:\t12\n";
        assert_eq!(fdinfo_memlock(fdinfo), Some(5_767_168));
        assert_eq!(fdinfo_memlock("pos:\t0\n"), None);
    }
}
