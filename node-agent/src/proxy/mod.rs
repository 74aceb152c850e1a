//! The Service proxy: compile the cluster into map content, diff it against what the datapath
//! holds, and write the difference.
mod compile;
mod diff;
mod state;

use std::time::{Duration, Instant};

pub use compile::{Compiled, Ids, compile};
pub use diff::diff;
pub use state::{Frontend, MapOp, MapState, proto_name};

use crate::{
    datapath::Datapath,
    model::{Cluster, ObjectError},
};

/// What one sync did.
#[derive(Debug)]
pub struct SyncReport {
    pub writes: usize,
    pub errors: Vec<ObjectError>,
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
        datapath: &mut Datapath,
    ) -> anyhow::Result<SyncReport> {
        let start = Instant::now();
        let Compiled { state, ids, errors } = compile(cluster, &self.ids);
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
            elapsed: start.elapsed(),
        })
    }
}
