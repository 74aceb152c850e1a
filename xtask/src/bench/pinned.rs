//! Reads node-agent's pinned maps with the bpf() syscall itself: xtask links no eBPF library,
//! so that it builds before the eBPF toolchain is installed.
use std::{
    ffi::CString,
    mem::MaybeUninit,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use anyhow::bail;
use nix::libc;

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_OBJ_GET: libc::c_long = 7;
/// `union bpf_attr` is larger; the kernel takes any size whose unused tail is zero.
const ATTR_WORDS: usize = 16;

pub struct PinnedMap(OwnedFd);

impl PinnedMap {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let path_c = CString::new(path.as_os_str().as_bytes())?;
        let mut attr = [0u64; ATTR_WORDS];
        attr[0] = path_c.as_ptr() as u64; // pathname; bpf_fd and file_flags stay 0
        // SAFETY: attr is a zeroed bpf_attr for BPF_OBJ_GET pointing at a live C string.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_OBJ_GET,
                attr.as_mut_ptr(),
                size_of_val(&attr),
            )
        };
        if fd < 0 {
            bail!(
                "opening pinned map {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: the kernel just returned this descriptor to us.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
    }

    /// The value under `key`; `V` must be the map's value type (plain data).
    pub fn get<K, V>(&self, key: &K) -> Option<V> {
        let mut value = MaybeUninit::<V>::zeroed();
        let mut attr = [0u64; ATTR_WORDS];
        attr[0] = self.0.as_raw_fd() as u64; // map_fd, then padding
        attr[1] = key as *const K as u64;
        attr[2] = value.as_mut_ptr() as u64;
        // SAFETY: key and value point at buffers of the map's key and value sizes.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_ELEM,
                attr.as_mut_ptr(),
                size_of_val(&attr),
            )
        };
        // SAFETY: on success the kernel filled the whole value.
        (ret == 0).then(|| unsafe { value.assume_init() })
    }
}
