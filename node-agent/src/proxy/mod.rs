//! The Service proxy: compile the cluster into map content, diff it against what the datapath
//! holds, and write the difference.
mod compile;
mod diff;
mod state;

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

pub use compile::{Compiled, HealthCheck, Ids, compile};
pub use diff::diff;
pub use state::{Frontend, MapOp, MapState, proto_name};

use crate::{
    datapath::Datapath,
    model::{Cluster, Node, ObjectError},
};

/// What one sync did.
#[derive(Debug)]
pub struct SyncReport {
    pub writes: usize,
    pub errors: Vec<ObjectError>,
    /// The healthCheckNodePort servers the Services ask for, by port.
    pub health_checks: BTreeMap<u16, HealthCheck>,
    pub elapsed: Duration,
}

/// Keeps what has been written, so each sync writes only the difference.
#[derive(Default)]
pub struct Proxy {
    ids: Ids,
    applied: MapState,
}

impl Proxy {
    pub fn sync(
        &mut self,
        cluster: &Cluster,
        node: &Node,
        datapath: &mut Datapath,
    ) -> anyhow::Result<SyncReport> {
        let start = Instant::now();
        let Compiled {
            state,
            ids,
            health_checks,
            errors,
        } = compile(cluster, node, &self.ids);
        self.ids = ids;
        let ops = diff(&self.applied, &state);
        for op in &ops {
            datapath.write(op)?;
            // Track each write as it lands: after a failure the next sync resumes from the truth.
            self.applied.apply(op);
        }
        Ok(SyncReport {
            writes: ops.len(),
            errors,
            health_checks,
            elapsed: start.elapsed(),
        })
    }
}
