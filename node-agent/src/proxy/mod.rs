//! The Service proxy: compile changed objects into map content, diff it against what the
//! datapath holds, and write the difference.
mod compile;
mod diff;
mod state;

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

pub use compile::{Compiler, HealthCheck, HeldFrontend, Update};
pub use diff::{diff, diff_each};
pub use state::{Frontend, MapOp, MapState, proto_name};

use crate::{
    datapath::Datapath,
    model::{Changes, Node, ObjectError},
};

/// What one sync did.
#[derive(Debug)]
pub struct SyncReport {
    pub writes: usize,
    /// What the objects compiled in this sync refused.
    pub errors: Vec<ObjectError>,
    /// The healthCheckNodePort servers the Services ask for, by port.
    pub health_checks: BTreeMap<u16, HealthCheck>,
    /// Compiling the changes and finding the writes, and writing them.
    pub compiled: Duration,
    pub written: Duration,
    /// Service and EndpointSlice changes staged for it (applied or deleted objects, each
    /// counted, even when unchanged), as kube-proxy counts them.
    pub service_changes: u64,
    pub endpoint_changes: u64,
}

/// Compiles changes and writes only the difference they make.
pub struct Proxy {
    compiler: Compiler,
    /// A write failed: the next sync diffs what the maps hold against the whole cluster.
    resync: bool,
    /// Changes staged since the last sync that succeeded: (Services, EndpointSlices).
    staged: (u64, u64),
}

impl Proxy {
    pub fn new(node: Node) -> Self {
        Self {
            compiler: Compiler::new(node),
            resync: false,
            staged: (0, 0),
        }
    }

    /// Takes in changes for the next sync (see `Compiler::stage`).
    pub fn stage(&mut self, changes: Changes) {
        self.staged.0 += changes.services.len() as u64;
        self.staged.1 += changes.endpoint_slices.len() as u64;
        self.compiler.stage(changes);
    }

    /// Every frontend a Service holds (see `Compiler::frontends`).
    pub fn frontends(&self) -> impl Iterator<Item = HeldFrontend<'_>> {
        self.compiler.frontends()
    }

    /// Compiles what was staged and writes the difference.
    pub fn sync(&mut self, datapath: &mut Datapath) -> anyhow::Result<SyncReport> {
        let start = Instant::now();
        let Update {
            before,
            after,
            errors,
        } = self.compiler.commit();
        let (before, after) = if self.resync {
            (datapath.read()?, self.compiler.state())
        } else {
            (before, after)
        };
        // Written as the diff finds them: no list of 330k writes on a first sync.
        let (mut writes, mut written, mut failed) = (0, Duration::ZERO, Ok(()));
        self.resync = true;
        diff_each(&before, &after, &mut |op| {
            if failed.is_ok() {
                let write = Instant::now();
                failed = datapath.write(&op);
                written += write.elapsed();
                writes += 1;
            }
        });
        failed?;
        self.resync = false;
        let (service_changes, endpoint_changes) = std::mem::take(&mut self.staged);
        Ok(SyncReport {
            service_changes,
            endpoint_changes,
            writes,
            errors,
            health_checks: self.compiler.health_checks(),
            compiled: start.elapsed() - written,
            written,
        })
    }
}
